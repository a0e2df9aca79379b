//! What server-initiated operations send to clients.

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::protocol::Envelope;

/// A message the server pushes to clients: `{"pid"?, "type", "fromUserId"?, "payload"?}`.
/// The pid is added by the tier for acknowledged sends and requests.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// `type`.
    pub kind: String,
    /// `payload`, raw JSON.
    pub payload: Option<Box<RawValue>>,
    /// `fromUserId`.
    pub from_user_id: Option<i64>,
}

impl OutMessage {
    /// A message of `kind` with a raw JSON payload. Fails if `payload` is not valid JSON.
    pub fn new(kind: impl Into<String>, payload: &str) -> Result<Self, serde_json::Error> {
        let payload = RawValue::from_string(payload.to_string())?;
        Ok(OutMessage { kind: kind.into(), payload: Some(payload), from_user_id: None })
    }

    /// A message of `kind` with a serializable payload.
    pub fn json(kind: impl Into<String>, payload: &impl serde::Serialize) -> Result<Self, serde_json::Error> {
        let payload = serde_json::value::to_raw_value(payload)?;
        Ok(OutMessage { kind: kind.into(), payload: Some(payload), from_user_id: None })
    }

    /// The frame for this message, with `pid` when given.
    pub fn frame(&self, pid: Option<&str>) -> Bytes {
        let mut envelope =
            Envelope::new(&self.kind).pid(pid).raw_payload(self.payload.as_ref().map(|p| p.get().as_bytes()));
        if let Some(from) = self.from_user_id {
            envelope = envelope.from_user(from);
        }
        envelope.frame()
    }
}
