//! The change event that travels from Region 1's outbox through Kafka to Region 2: a JSON
//! envelope with CloudEvents 1.0 attributes whose `data` is the document's state after the
//! write. Defined once here; the relay encodes it, the consumer decodes and validates it.
//!
//! Kafka layout: one topic (`KAFKA_TOPIC`, default `tandem.documents`); the message key is
//! `collection/id`, so all events of one document land on one partition, in order; headers carry
//! `traceparent`, `ce_id`, `ce_type` and `tandem-collection` for routing and tracing without
//! parsing the body.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::document::{Collection, Document, DocumentId, DocumentKey, Stored};

pub const SPEC_VERSION: &str = "1.0";
pub const TYPE_UPSERTED: &str = "dev.tandem.document.upserted";
pub const TYPE_DELETED: &str = "dev.tandem.document.deleted";
/// A relay heartbeat: "every write Region 1 committed before `time` is in this partition
/// before me". Region 2's lag is the age of the oldest partition's newest heartbeat.
pub const TYPE_HEARTBEAT: &str = "dev.tandem.heartbeat";
/// The message key of heartbeats (they go to explicit partitions; the key only names them).
pub const HEARTBEAT_KEY: &str = "tandem.heartbeat";

/// The change event schema this build writes. Version 2 added the origin attributes
/// (`originregion`, `writeepoch`, `sequence`) and the [`HEADER_SCHEMA`] header; version 1 events
/// (no `tandemschema` attribute, no header) are still read. A consumer holds back, rather
/// than misapplies or dead-letters, an event of a version newer than this.
pub const SCHEMA_VERSION: u32 = 2;

pub const HEADER_TRACEPARENT: &str = "traceparent";
/// `tandem-schema`: the event's schema version ([`SCHEMA_VERSION`]), so that a consumer can
/// tell an event it does not understand without parsing it. Absent on version 1 events.
pub const HEADER_SCHEMA: &str = "tandem-schema";
pub const HEADER_EVENT_ID: &str = "ce_id";
pub const HEADER_EVENT_TYPE: &str = "ce_type";
pub const HEADER_COLLECTION: &str = "tandem-collection";

/// What a message's headers say, so that it can be routed and traced without parsing its body:
/// the one codec of them. The relay (and the benchmark's raw producer) encode them with
/// [`EventHeaders::encode`]; the consumer reads them with [`EventHeaders::decode`]. Values are
/// text: a header the producer sent as other bytes decodes lossily.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventHeaders {
    /// `ce_id`: the event id (a heartbeat's own id).
    pub event_id: Option<String>,
    /// `ce_type`: the CloudEvents type ([`TYPE_UPSERTED`], [`TYPE_DELETED`], [`TYPE_HEARTBEAT`]).
    pub kind: Option<String>,
    /// `tandem-collection`: the document's collection (none on heartbeats).
    pub collection: Option<String>,
    /// `traceparent`: the write's trace context, when the outbox row has one.
    pub traceparent: Option<String>,
    /// `tandem-schema`: the schema version (none on version 1 events and on heartbeats).
    pub schema: Option<String>,
}

/// What a message's schema version means to this build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    /// A version this build reads.
    Known(u32),
    /// A version newer than [`SCHEMA_VERSION`]: written by a newer relay.
    Newer(u32),
    /// Not a version at all.
    Invalid(String),
}

impl EventHeaders {
    /// The headers of a change event.
    pub fn change(
        event_id: Uuid,
        deleted: bool,
        collection: &Collection,
        traceparent: Option<String>,
    ) -> Self {
        Self {
            event_id: Some(event_id.to_string()),
            kind: Some(if deleted { TYPE_DELETED } else { TYPE_UPSERTED }.to_owned()),
            collection: Some(collection.as_str().to_owned()),
            traceparent,
            schema: Some(SCHEMA_VERSION.to_string()),
        }
    }

    /// The headers of a heartbeat.
    pub fn heartbeat(id: Uuid) -> Self {
        Self {
            event_id: Some(id.to_string()),
            kind: Some(TYPE_HEARTBEAT.to_owned()),
            collection: None,
            traceparent: None,
            schema: None,
        }
    }

    /// The headers as they go on the wire, in this order: `ce_id`, `ce_type`,
    /// `tandem-collection`, `traceparent`, `tandem-schema`, each only when set.
    pub fn encode(self) -> Vec<(&'static str, Vec<u8>)> {
        [
            (HEADER_EVENT_ID, self.event_id),
            (HEADER_EVENT_TYPE, self.kind),
            (HEADER_COLLECTION, self.collection),
            (HEADER_TRACEPARENT, self.traceparent),
            (HEADER_SCHEMA, self.schema),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?.into_bytes())))
        .collect()
    }

    /// Reads received headers, `(name, value)` in the order they came; `None` for a name the
    /// client could not read or a header without a value. Of several headers with one name the
    /// last counts; headers this codec does not know are passed over.
    pub fn decode<'a>(
        headers: impl IntoIterator<Item = (Option<&'a str>, Option<&'a [u8]>)>,
    ) -> Self {
        let mut decoded = Self::default();
        for (name, value) in headers {
            let field = match name {
                Some(HEADER_EVENT_ID) => &mut decoded.event_id,
                Some(HEADER_EVENT_TYPE) => &mut decoded.kind,
                Some(HEADER_COLLECTION) => &mut decoded.collection,
                Some(HEADER_TRACEPARENT) => &mut decoded.traceparent,
                Some(HEADER_SCHEMA) => &mut decoded.schema,
                _ => continue,
            };
            *field = value.map(|v| String::from_utf8_lossy(v).into_owned());
        }
        decoded
    }

    /// The event id, when it is one.
    pub fn event_uuid(&self) -> Option<Uuid> {
        self.event_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok())
    }

    /// The schema version the `tandem-schema` header names (1 without the header).
    pub fn schema(&self) -> Schema {
        match self.schema.as_deref() {
            None => Schema::Known(1),
            Some(text) => match text.parse::<u32>() {
                Ok(v @ 1..=SCHEMA_VERSION) => Schema::Known(v),
                Ok(v) if v > SCHEMA_VERSION => Schema::Newer(v),
                _ => Schema::Invalid(format!("{HEADER_SCHEMA} {text:?} is not a schema version")),
            },
        }
    }

    /// Whether the message is a relay heartbeat rather than a change event.
    pub fn is_heartbeat(&self) -> bool {
        self.kind.as_deref() == Some(TYPE_HEARTBEAT)
    }
}

/// The Kafka message key of a document's events (and their `subject`): `collection/id`, so
/// that every event of one document goes to one partition, in order.
pub fn partition_key(key: &DocumentKey) -> String {
    format!("{}/{}", key.collection, key.id)
}

/// A document's state after a write: a live document or a tombstone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentState {
    pub collection: Collection,
    pub id: DocumentId,
    pub version: i64,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub created_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Set on the events `tandem repair` emits (never on a write's): see [`Repair`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
}

/// What makes an event a repair: Region 1's current state of a document re-emitted because
/// `tandem verify` found Region 2's copy different, with Region 2's version as verify saw it.
///
/// The apply writes an ordinary event only over an older version (`stored < version`). A
/// repair (fresh, never a redelivered one) is written also over the same version (same
/// version, different content: Region 1's state of a version is the true one) and over
/// exactly `replaces` (Region 2 ahead of Region 1). A *purge* removes Region 2's row, which
/// Region 1 does not have, only while it still holds exactly `replaces`: a delete, not a
/// tombstone, so that a later version-1 create applies. A purge travels as a tombstone at
/// version `replaces`, so an apply that predates repairs skips it as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repair {
    /// Region 2's version when verify compared it; `None` when Region 2 had no row.
    #[serde(default)]
    pub replaces: Option<i64>,
    /// Remove Region 2's row (Region 1 has none).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purge: bool,
}

impl DocumentState {
    pub fn key(&self) -> DocumentKey {
        DocumentKey::new(self.collection.clone(), self.id.clone())
    }

    /// The state as stored in a region's database.
    pub fn to_stored(&self) -> Stored {
        match (&self.data, self.deleted) {
            (Some(data), false) => Stored::Live(Document {
                collection: self.collection.clone(),
                id: self.id.clone(),
                version: self.version,
                data: data.clone(),
                created_at: self.created_at.unwrap_or(self.updated_at),
                updated_at: self.updated_at,
            }),
            _ => Stored::Deleted {
                version: self.version,
            },
        }
    }
}

/// The payload of a delete event (a [`DocumentState`] without `data` or `created_at`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub collection: Collection,
    pub id: DocumentId,
    pub version: i64,
    pub deleted: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// The envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub specversion: String,
    /// The outbox event id (UUIDv7): the consumer's deduplication key.
    pub id: Uuid,
    /// `/tandem/<region>`.
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// When the write committed in Region 1 (the outbox row's `created_at`).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// `collection/id`.
    pub subject: String,
    pub datacontenttype: String,
    /// The schema version ([`SCHEMA_VERSION`]); absent on version 1 events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tandemschema: Option<u32>,
    /// Version 2: the region whose write this is ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub originregion: Option<String>,
    /// ... the write epoch it was committed in (the write region's term) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeepoch: Option<i64>,
    /// ... and its outbox sequence there (insertion order of the origin's outbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<i64>,
    pub data: DocumentState,
}

/// Where a write was committed: its region, the write epoch, and its outbox sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub region: String,
    pub write_epoch: i64,
    pub sequence: i64,
}

impl Origin {
    pub fn new(region: &str, write_epoch: i64, sequence: i64) -> Self {
        Self {
            region: region.to_owned(),
            write_epoch,
            sequence,
        }
    }
}

/// The envelope's attributes without `data`: what the relay writes around a stored payload.
#[derive(Serialize)]
struct EnvelopeHead<'a> {
    specversion: &'a str,
    id: Uuid,
    source: String,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    time: OffsetDateTime,
    subject: String,
    datacontenttype: &'a str,
    tandemschema: u32,
    originregion: &'a str,
    writeepoch: i64,
    sequence: i64,
}

/// Encodes the envelope of a stored outbox row around its payload, which is passed through
/// as the JSON text PostgreSQL rendered: never parsed, so no depth limit or number format can
/// trip the relay, and no `serde_json::Value` is built per row. The result decodes as a
/// [`ChangeEvent`] exactly as [`ChangeEvent::encode`]'s does.
pub fn encode_envelope(
    id: Uuid,
    origin: &Origin,
    time: OffsetDateTime,
    deleted: bool,
    key: &DocumentKey,
    payload_json: &str,
) -> Vec<u8> {
    let head = EnvelopeHead {
        specversion: SPEC_VERSION,
        id,
        source: format!("/tandem/{}", origin.region),
        kind: if deleted { TYPE_DELETED } else { TYPE_UPSERTED },
        time,
        subject: partition_key(key),
        datacontenttype: "application/json",
        tandemschema: SCHEMA_VERSION,
        originregion: &origin.region,
        writeepoch: origin.write_epoch,
        sequence: origin.sequence,
    };
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    // `{…}` → `{…,"data":<payload>}`
    out.pop();
    out.reserve(payload_json.len() + 9);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(payload_json.as_bytes());
    out.push(b'}');
    out
}

/// A heartbeat's envelope: the same CloudEvents attributes, `data` naming the partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub specversion: String,
    pub id: Uuid,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Region 1's commit clock: every write committed before it was published before this
    /// heartbeat (up to transactions still in flight when it was taken).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub subject: String,
    pub datacontenttype: String,
    pub data: HeartbeatData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatData {
    pub partition: i32,
    /// The write region and write epoch the sending region's database records (absent from
    /// relays before them, and from a database without a role): a region that learns of a
    /// newer write epoch this way stops taking writes even when no write flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeregion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeepoch: Option<i64>,
}

impl Heartbeat {
    pub fn new(source_region: &str, time: OffsetDateTime, partition: i32) -> Self {
        Self {
            specversion: SPEC_VERSION.to_owned(),
            id: Uuid::now_v7(),
            source: format!("/tandem/{source_region}"),
            kind: TYPE_HEARTBEAT.to_owned(),
            time,
            subject: format!("heartbeat/{partition}"),
            datacontenttype: "application/json".to_owned(),
            data: HeartbeatData {
                partition,
                writeregion: None,
                writeepoch: None,
            },
        }
    }

    /// The write region and epoch the sender's database records.
    #[must_use]
    pub fn with_write_role(mut self, write_region: &str, write_epoch: i64) -> Self {
        self.data.writeregion = Some(write_region.to_owned());
        self.data.writeepoch = Some(write_epoch);
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PoisonReason> {
        let heartbeat: Self =
            serde_json::from_slice(bytes).map_err(|e| PoisonReason::Undecodable(e.to_string()))?;
        if heartbeat.specversion != SPEC_VERSION || heartbeat.kind != TYPE_HEARTBEAT {
            return Err(PoisonReason::Invalid("not a heartbeat".to_owned()));
        }
        Ok(heartbeat)
    }
}

/// Why an event cannot be applied: it goes to the dead-letter store with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoisonReason {
    #[error("undecodable event: {0}")]
    Undecodable(String),
    #[error("invalid event: {0}")]
    Invalid(String),
    /// Not poison: a schema version newer than this build reads ([`SCHEMA_VERSION`]). The
    /// consumer holds the partition back until it is upgraded; it never dead-letters these.
    #[error(
        "event schema version {0} is newer than this consumer reads (up to {SCHEMA_VERSION}): upgrade the consumers before the relay"
    )]
    NewerSchema(u32),
}

impl ChangeEvent {
    /// Wraps a committed document state (the current schema version).
    pub fn new(id: Uuid, origin: &Origin, time: OffsetDateTime, data: DocumentState) -> Self {
        let kind = if data.deleted {
            TYPE_DELETED
        } else {
            TYPE_UPSERTED
        };
        Self {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: format!("/tandem/{}", origin.region),
            kind: kind.to_owned(),
            time,
            subject: partition_key(&data.key()),
            datacontenttype: "application/json".to_owned(),
            tandemschema: Some(SCHEMA_VERSION),
            originregion: Some(origin.region.clone()),
            writeepoch: Some(origin.write_epoch),
            sequence: Some(origin.sequence),
            data,
        }
    }

    /// The event's schema version (1 when the attribute is absent).
    pub fn schema_version(&self) -> u32 {
        self.tandemschema.unwrap_or(1)
    }

    /// Where the write was committed; `None` for a version 1 event, which predates origins
    /// (every one of them was written by Region 1, the only write region there was).
    pub fn origin(&self) -> Option<Origin> {
        Some(Origin {
            region: self.originregion.clone()?,
            write_epoch: self.writeepoch?,
            sequence: self.sequence?,
        })
    }

    /// The Kafka message key: every event of one document goes to one partition.
    pub fn partition_key(&self) -> &str {
        &self.subject
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and validates an event; anything wrong is a poison reason, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, PoisonReason> {
        let event: Self =
            serde_json::from_slice(bytes).map_err(|e| PoisonReason::Undecodable(e.to_string()))?;
        event.validate()?;
        Ok(event)
    }

    fn validate(&self) -> Result<(), PoisonReason> {
        let invalid = |m: &str| Err(PoisonReason::Invalid(m.to_owned()));
        if self.specversion != SPEC_VERSION {
            return invalid("unsupported specversion");
        }
        match self.tandemschema {
            None => {}
            Some(v) if v > SCHEMA_VERSION => return Err(PoisonReason::NewerSchema(v)),
            Some(0 | 1) => {
                return invalid("tandemschema 1 is written by leaving the attribute out");
            }
            Some(_) => {
                if self.originregion.as_deref().is_none_or(str::is_empty) {
                    return invalid("a version 2 event names its originregion");
                }
                if self.writeepoch.is_none_or(|e| e < 1) {
                    return invalid("a version 2 event has a positive writeepoch");
                }
                if self.sequence.is_none_or(|s| s < 1) {
                    return invalid("a version 2 event has a positive sequence");
                }
            }
        }
        if self.data.version < 1 {
            return invalid("version must be positive");
        }
        let expected_type = if self.data.deleted {
            TYPE_DELETED
        } else {
            TYPE_UPSERTED
        };
        if self.kind != expected_type {
            return invalid("type does not match the document state");
        }
        if self.data.deleted == self.data.data.is_some() {
            return invalid("a live document needs data and a tombstone must have none");
        }
        if self.subject != partition_key(&self.data.key()) {
            return invalid("subject does not match the document");
        }
        if let Some(repair) = &self.data.repair {
            if repair.replaces.is_some_and(|v| v < 1) {
                return invalid("a repair replaces a positive version");
            }
            if repair.purge && (!self.data.deleted || repair.replaces != Some(self.data.version)) {
                return invalid("a purge is a tombstone at the version it replaces");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            region: "region1".to_owned(),
            write_epoch: 1,
            sequence: 7,
        }
    }

    fn state(deleted: bool) -> DocumentState {
        DocumentState {
            collection: Collection::parse("orders").expect("valid"),
            id: DocumentId::parse("o1").expect("valid"),
            version: 3,
            deleted,
            data: (!deleted).then(|| Map::from_iter([("a".to_owned(), Value::from(1))])),
            created_at: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            repair: None,
        }
    }

    #[test]
    fn a_passed_through_payload_decodes_like_an_encoded_event() {
        for deleted in [false, true] {
            let event = ChangeEvent::new(
                Uuid::now_v7(),
                &origin(),
                OffsetDateTime::UNIX_EPOCH,
                state(deleted),
            );
            let payload = serde_json::to_string(&event.data).expect("json");
            let bytes = encode_envelope(
                event.id,
                &origin(),
                event.time,
                deleted,
                &event.data.key(),
                &payload,
            );
            assert_eq!(ChangeEvent::decode(&bytes), Ok(event));
        }
    }

    #[test]
    fn headers_go_on_the_wire_in_one_order() {
        let id = Uuid::parse_str("0190b5a1-7c00-7000-8000-000000000001").expect("uuid");
        let collection = Collection::parse("orders").expect("valid");
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let wire = EventHeaders::change(id, false, &collection, Some(tp.to_owned())).encode();
        let expected: Vec<(&str, &[u8])> = vec![
            ("ce_id", b"0190b5a1-7c00-7000-8000-000000000001"),
            ("ce_type", b"dev.tandem.document.upserted"),
            ("tandem-collection", b"orders"),
            ("traceparent", tp.as_bytes()),
            ("tandem-schema", b"2"),
        ];
        let actual: Vec<(&str, &[u8])> = wire.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        assert_eq!(actual, expected);

        let deleted = EventHeaders::change(id, true, &collection, None).encode();
        assert_eq!(deleted.len(), 4);
        assert_eq!(deleted[1].1, TYPE_DELETED.as_bytes());

        let heartbeat = EventHeaders::heartbeat(id).encode();
        let names: Vec<&str> = heartbeat.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["ce_id", "ce_type"]);
        assert_eq!(heartbeat[1].1, TYPE_HEARTBEAT.as_bytes());
    }

    #[test]
    fn headers_decode_what_they_encode_and_survive_foreign_ones() {
        let id = Uuid::now_v7();
        let collection = Collection::parse("orders").expect("valid");
        let sent = EventHeaders::change(id, true, &collection, None);
        let wire = sent.clone().encode();
        let decoded =
            EventHeaders::decode(wire.iter().map(|(n, v)| (Some(*n), Some(v.as_slice()))));
        assert_eq!(decoded, sent);
        assert_eq!(decoded.event_uuid(), Some(id));
        assert!(!decoded.is_heartbeat());
        assert!(
            EventHeaders::decode(
                EventHeaders::heartbeat(id)
                    .encode()
                    .iter()
                    .map(|(n, v)| (Some(*n), Some(v.as_slice())))
            )
            .is_heartbeat()
        );

        // Unknown and unreadable names are passed over, the last of a name counts (even
        // without a value), and bytes that are not UTF-8 decode lossily.
        let foreign: Vec<(Option<&str>, Option<&[u8]>)> = vec![
            (Some("ce_id"), Some(b"\x00\xff")),
            (None, Some(b"x")),
            (Some("x-other"), Some(b"y")),
            (Some("ce_type"), Some(b"a")),
            (Some("ce_type"), None),
        ];
        let decoded = EventHeaders::decode(foreign);
        assert_eq!(decoded.event_id.as_deref(), Some("\0\u{fffd}"));
        assert_eq!(decoded.event_uuid(), None);
        assert_eq!(decoded.kind, None);
        assert_eq!(EventHeaders::decode([]), EventHeaders::default());
    }

    #[test]
    fn repair_events_round_trip_and_a_purge_must_be_a_tombstone_at_what_it_replaces() {
        let event = |deleted: bool, version: i64, repair: Repair| {
            let mut state = state(deleted);
            state.version = version;
            state.repair = Some(repair);
            ChangeEvent::new(Uuid::now_v7(), &origin(), OffsetDateTime::UNIX_EPOCH, state)
        };
        let reemit = event(
            false,
            3,
            Repair {
                replaces: Some(7),
                purge: false,
            },
        );
        let json: Value = serde_json::from_slice(&reemit.encode()).expect("json");
        assert_eq!(json["data"]["repair"], serde_json::json!({"replaces": 7}));
        assert_eq!(ChangeEvent::decode(&reemit.encode()), Ok(reemit));
        let purge = Repair {
            replaces: Some(4),
            purge: true,
        };
        let good = event(true, 4, purge);
        assert_eq!(ChangeEvent::decode(&good.encode()), Ok(good));
        for bad in [event(false, 4, purge), event(true, 5, purge)] {
            assert!(matches!(
                ChangeEvent::decode(&bad.encode()),
                Err(PoisonReason::Invalid(_))
            ));
        }
        // An ordinary event has no `repair` field at all.
        let plain = ChangeEvent::new(
            Uuid::now_v7(),
            &origin(),
            OffsetDateTime::UNIX_EPOCH,
            state(false),
        );
        let json: Value = serde_json::from_slice(&plain.encode()).expect("json");
        assert!(json["data"].get("repair").is_none());
    }

    #[test]
    fn heartbeats_round_trip_and_are_not_change_events() {
        let heartbeat = Heartbeat::new("region1", OffsetDateTime::UNIX_EPOCH, 2);
        assert_eq!(
            Heartbeat::decode(&heartbeat.encode()),
            Ok(heartbeat.clone())
        );
        assert!(ChangeEvent::decode(&heartbeat.encode()).is_err());
    }

    #[test]
    fn events_round_trip_and_invalid_ones_are_poison() {
        for deleted in [false, true] {
            let event = ChangeEvent::new(
                Uuid::now_v7(),
                &origin(),
                OffsetDateTime::UNIX_EPOCH,
                state(deleted),
            );
            assert_eq!(ChangeEvent::decode(&event.encode()), Ok(event));
        }
        assert!(matches!(
            ChangeEvent::decode(b"not json"),
            Err(PoisonReason::Undecodable(_))
        ));
        let mut wrong = ChangeEvent::new(
            Uuid::now_v7(),
            &origin(),
            OffsetDateTime::UNIX_EPOCH,
            state(false),
        );
        wrong.kind = TYPE_DELETED.to_owned();
        assert!(matches!(
            ChangeEvent::decode(&wrong.encode()),
            Err(PoisonReason::Invalid(_))
        ));
        let mut bad_collection = serde_json::to_value(ChangeEvent::new(
            Uuid::now_v7(),
            &origin(),
            OffsetDateTime::UNIX_EPOCH,
            state(false),
        ))
        .expect("json");
        bad_collection["data"]["collection"] = Value::from("Not Valid");
        assert!(ChangeEvent::decode(bad_collection.to_string().as_bytes()).is_err());
    }

    #[test]
    fn a_version_1_event_still_decodes_without_an_origin() {
        let current = ChangeEvent::new(
            Uuid::now_v7(),
            &origin(),
            OffsetDateTime::UNIX_EPOCH,
            state(false),
        );
        let mut old = serde_json::to_value(&current).expect("serialises");
        for attribute in ["tandemschema", "originregion", "writeepoch", "sequence"] {
            old.as_object_mut().expect("object").remove(attribute);
        }
        let decoded = ChangeEvent::decode(old.to_string().as_bytes()).expect("version 1 reads");
        assert_eq!(decoded.schema_version(), 1);
        assert_eq!(decoded.origin(), None);
        assert_eq!(decoded.data, current.data);
        assert_eq!(current.schema_version(), SCHEMA_VERSION);
        assert_eq!(current.origin(), Some(origin()));
    }

    #[test]
    fn a_newer_schema_is_not_poison_and_a_version_2_event_needs_its_origin() {
        let event = ChangeEvent::new(
            Uuid::now_v7(),
            &origin(),
            OffsetDateTime::UNIX_EPOCH,
            state(false),
        );
        let mut newer = event.clone();
        newer.tandemschema = Some(SCHEMA_VERSION + 1);
        newer.writeepoch = None;
        assert_eq!(
            ChangeEvent::decode(&newer.encode()),
            Err(PoisonReason::NewerSchema(SCHEMA_VERSION + 1))
        );
        for broken in [
            ChangeEvent {
                originregion: None,
                ..event.clone()
            },
            ChangeEvent {
                writeepoch: Some(0),
                ..event.clone()
            },
            ChangeEvent {
                sequence: None,
                ..event.clone()
            },
            ChangeEvent {
                tandemschema: Some(1),
                ..event.clone()
            },
        ] {
            assert!(matches!(
                ChangeEvent::decode(&broken.encode()),
                Err(PoisonReason::Invalid(_))
            ));
        }
    }

    #[test]
    fn the_schema_header_names_the_version() {
        let headers = |value: Option<&str>| EventHeaders {
            schema: value.map(str::to_owned),
            ..EventHeaders::default()
        };
        assert_eq!(headers(None).schema(), Schema::Known(1));
        assert_eq!(headers(Some("2")).schema(), Schema::Known(2));
        assert_eq!(headers(Some("3")).schema(), Schema::Newer(3));
        assert!(matches!(headers(Some("0")).schema(), Schema::Invalid(_)));
        assert!(matches!(headers(Some("two")).schema(), Schema::Invalid(_)));
        let change = EventHeaders::change(
            Uuid::now_v7(),
            false,
            &Collection::parse("orders").expect("valid"),
            None,
        );
        let wire = change.clone().encode();
        assert!(wire.iter().any(|(n, v)| *n == HEADER_SCHEMA && v == b"2"));
        let decoded =
            EventHeaders::decode(wire.iter().map(|(n, v)| (Some(*n), Some(v.as_slice()))));
        assert_eq!(decoded, change);
    }
}
