//! Applying one Kafka message to Region 2: the transaction, the cache update, the dead-letter
//! path and the retry policy. The code lives in `tandem-region2-apply`
//! (`consumers/region2-apply`), shared with Region 2's Lambda apply; this crate enables its
//! `rdkafka` feature for [`Incoming::from_message`] and [`read_headers`].

pub use tandem_region2_apply::apply::*;
