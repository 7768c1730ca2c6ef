//! AMQP 1.0 framing: protocol headers, frame boundaries, and performative + payload split.
//!
//! Every length read from the peer is checked against the negotiated maximum before any
//! allocation, so a hostile size field cannot exhaust memory.

use fe2o3_amqp_types::performatives::Performative;
use fe2o3_amqp_types::primitives::{Symbol, Value};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{CodecError, decode, encode, encoded_len};

/// Header that starts the SASL layer (`AMQP 3 1 0 0`).
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// Header that starts the AMQP layer without SASL (`AMQP 0 1 0 0`).
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// Frame type of AMQP frames.
pub const TYPE_AMQP: u8 = 0;
/// Frame type of SASL frames.
pub const TYPE_SASL: u8 = 1;
/// The smallest max-frame-size AMQP allows; used until Open says otherwise.
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// Why the byte stream cannot go on.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The socket failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The size field is smaller than a frame header or larger than we allow.
    #[error("frame size {size} outside 8..={max}")]
    BadSize {
        /// Size the peer announced.
        size: u32,
        /// Our limit.
        max: u32,
    },
    /// The data offset points outside the frame.
    #[error("bad data offset {0}")]
    BadOffset(u8),
    /// The body is not a valid performative.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// One frame as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// 0 = AMQP, 1 = SASL.
    pub frame_type: u8,
    /// Session channel (AMQP frames only).
    pub channel: u16,
    /// Everything after the extended header; empty for heartbeats.
    pub body: Vec<u8>,
}

/// A decoded AMQP frame: a performative and, for transfers, the payload after it.
#[derive(Debug, Clone)]
pub struct AmqpFrame {
    /// Session channel.
    pub channel: u16,
    /// The performative.
    pub performative: Performative,
    /// Transfer payload (message bytes); empty for other performatives.
    pub payload: Vec<u8>,
}

/// Reads the 8-byte protocol header.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<[u8; 8], FrameError> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header).await?;
    Ok(header)
}

/// Reads one frame, refusing sizes above `max_size`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_size: u32,
) -> Result<RawFrame, FrameError> {
    let size = r.read_u32().await?;
    if !(8..=max_size).contains(&size) {
        return Err(FrameError::BadSize {
            size,
            max: max_size,
        });
    }
    let mut rest = vec![0u8; size as usize - 4];
    r.read_exact(&mut rest).await?;
    let doff = rest[0];
    let frame_type = rest[1];
    let channel = u16::from_be_bytes([rest[2], rest[3]]);
    let start = usize::from(doff) * 4;
    if doff < 2 || start > size as usize {
        return Err(FrameError::BadOffset(doff));
    }
    let body = rest.split_off(start - 4);
    Ok(RawFrame {
        frame_type,
        channel,
        body,
    })
}

/// Splits an AMQP frame body into its performative and payload. `None` means heartbeat.
pub fn decode_amqp(raw: RawFrame) -> Result<Option<AmqpFrame>, CodecError> {
    if raw.body.is_empty() {
        return Ok(None);
    }
    let len = encoded_len(&raw.body)?;
    let bytes = &raw.body[..len];
    let performative: Performative = match decode("performative", bytes) {
        Ok(p) => p,
        Err(e) => lenient(bytes).ok_or(e)?,
    };
    let payload = raw.body[len..].to_vec();
    Ok(Some(AmqpFrame {
        channel: raw.channel,
        performative,
        payload,
    }))
}

/// Retries a performative whose `fields` maps have `str` keys where AMQP says `sym`. JS
/// (rhea) sends the dead-letter `info` and `properties-to-modify` that way, and one bad key
/// must not cost the client its connection.
fn lenient(bytes: &[u8]) -> Option<Performative> {
    let mut value: Value = serde_amqp::from_slice(bytes).ok()?;
    symbolize_keys(&mut value, 0);
    let again = serde_amqp::to_vec(&value).ok()?;
    serde_amqp::from_slice(&again).ok()
}

fn symbolize_keys(value: &mut Value, depth: usize) {
    if depth > 16 {
        return;
    }
    match value {
        Value::Described(d) => symbolize_keys(&mut d.value, depth + 1),
        Value::List(items) => items.iter_mut().for_each(|v| symbolize_keys(v, depth + 1)),
        Value::Map(map) => {
            let entries = std::mem::take(map.as_inner_mut());
            for (k, mut v) in entries {
                symbolize_keys(&mut v, depth + 1);
                let k = match k {
                    Value::String(s) => Value::Symbol(Symbol::from(s)),
                    other => other,
                };
                map.insert(k, v);
            }
        }
        _ => {}
    }
}

/// Encodes a frame of `frame_type` on `channel` with an already-encoded body.
pub fn encode_raw(frame_type: u8, channel: u16, body: &[u8]) -> Vec<u8> {
    let size = 8 + body.len();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.push(2);
    out.push(frame_type);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Encodes an AMQP frame.
pub fn encode_amqp(
    channel: u16,
    performative: &Performative,
    payload: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let mut body = encode("performative", performative)?;
    body.extend_from_slice(payload);
    Ok(encode_raw(TYPE_AMQP, channel, &body))
}

/// Writes bytes and flushes.
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), FrameError> {
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Empty frame used as a heartbeat.
pub fn heartbeat() -> Vec<u8> {
    encode_raw(TYPE_AMQP, 0, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::performatives::Close;

    #[tokio::test]
    async fn frame_round_trip() -> Result<(), FrameError> {
        let bytes = encode_amqp(3, &Performative::Close(Close { error: None }), b"xy")?;
        let raw = read_frame(&mut bytes.as_slice(), 1024).await?;
        assert_eq!(raw.channel, 3);
        let frame = decode_amqp(raw)?.ok_or(FrameError::BadOffset(0))?;
        assert!(matches!(frame.performative, Performative::Close(_)));
        assert_eq!(frame.payload, b"xy");
        Ok(())
    }

    #[test]
    fn string_keyed_error_info_is_accepted() -> Result<(), CodecError> {
        // disposition(role=receiver, first=2, last=2, settled=false,
        //   rejected(error(com.microsoft:dead-letter, null, {"DeadLetterReason": "R"})))
        let info = serde_amqp::to_vec(&std::collections::BTreeMap::from([(
            "DeadLetterReason".to_string(),
            "R".to_string(),
        )]))
        .map_err(|e| CodecError::Decode {
            what: "test",
            reason: e.to_string(),
        })?;
        let mut error = vec![0x00, 0x53, 0x1d, 0xc0, 0, 3];
        error.extend([0xa3, 25]);
        error.extend(b"com.microsoft:dead-letter");
        error.push(0x40);
        error.extend(info);
        error[4] = (error.len() - 5) as u8;
        let mut rejected = vec![0x00, 0x53, 0x25, 0xc0, 0, 1];
        rejected.extend(error);
        rejected[4] = (rejected.len() - 5) as u8;
        let mut body = vec![0x00, 0x53, 0x15, 0xc0, 0, 5, 0x41, 0x52, 2, 0x52, 2, 0x42];
        body.extend(rejected);
        body[4] = (body.len() - 5) as u8;
        let raw = RawFrame {
            frame_type: TYPE_AMQP,
            channel: 0,
            body,
        };
        let frame = decode_amqp(raw)?.ok_or(CodecError::Truncated)?;
        assert!(matches!(frame.performative, Performative::Disposition(_)));
        Ok(())
    }

    #[tokio::test]
    async fn oversized_frame_is_refused() {
        let bytes = [0xffu8, 0xff, 0xff, 0xff, 2, 0, 0, 0];
        let err = read_frame(&mut bytes.as_slice(), 1024).await;
        assert!(matches!(err, Err(FrameError::BadSize { .. })));
    }
}
