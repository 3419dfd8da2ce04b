//! Replication: Region 1 outbox → relay → Kafka-protocol broker → Region 2 consumer → Region 2
//! PostgreSQL, Redis and Read API; with crashes, outages and data loss along the way.

mod end_to_end;
