//! The consumer's own metrics, registered next to the common HTTP ones (defined in
//! `tandem-region2-apply`, shared with Region 2's Lambda apply).

pub use tandem_region2_apply::metrics::*;
