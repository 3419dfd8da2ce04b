//! Region 2's apply: change events to Region 2's PostgreSQL and Redis, effectively once.
//!
//! Two runners share it:
//!
//! * the consumer pod (`tandem-region2-consumer`, `consumers/region2`), which reads Kafka
//!   itself, elects one active replica and keeps its Kafka positions with the data;
//! * the Lambda function `tandem-region2-apply-lambda` ([`lambda`]), invoked by a Kafka event
//!   source mapping that polls the topic, keeps the positions and retries what the function
//!   reports as failed.
//!
//! Either way a batch commits in one transaction with its event ids (`applied_events`), the
//! heartbeats it carried and the position after it, poison goes to `dead_letters`, and Region 2's
//! Redis gets the applied states after the commit ([`apply`]).

pub mod apply;
pub mod lambda;
pub mod metrics;

pub use apply::{Applier, Incoming, KafkaHeader, Outcome};
pub use metrics::ConsumerMetrics;
