//! The connection preamble: SASL (ANONYMOUS or PLAIN) or the plain AMQP header, on one port.
//!
//! Python always negotiates SASL ANONYMOUS; JS skips SASL when its connection string has no
//! key name (§1.3, §0.5). Authorisation happens later through CBS tokens, so the SASL step
//! accepts any identity.

use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use tokio::io::{AsyncRead, AsyncWrite};

use super::codec::{decode, descriptor_code, encode, encoded_len};
use super::frame::{
    AMQP_HEADER, FrameError, MIN_MAX_FRAME_SIZE, SASL_HEADER, TYPE_SASL, encode_raw, read_frame,
    read_header, write_all,
};

/// Why the preamble failed.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    /// Framing or socket failure.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The first 8 bytes were not an AMQP 1.0 header we speak.
    #[error("unsupported protocol header {0:02x?}")]
    BadHeader([u8; 8]),
    /// The peer picked a mechanism we did not offer, or sent something else than sasl-init.
    #[error("sasl: {0}")]
    Sasl(String),
}

/// Mechanisms offered to clients.
const MECHANISMS: [&str; 2] = ["ANONYMOUS", "PLAIN"];

/// Runs the preamble until the AMQP header has been exchanged.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Result<(), PreambleError> {
    let header = read_header(io).await?;
    if header == AMQP_HEADER {
        tracing::debug!("Client skipped SASL (plain AMQP header).");
        write_all(io, &AMQP_HEADER).await?;
        return Ok(());
    }
    if header != SASL_HEADER {
        // Tell the peer what we speak, as AMQP asks, then give up.
        let _ = write_all(io, &SASL_HEADER).await;
        return Err(PreambleError::BadHeader(header));
    }
    write_all(io, &SASL_HEADER).await?;
    let mechanisms = SaslMechanisms {
        sasl_server_mechanisms: Array(MECHANISMS.iter().map(|m| Symbol::from(*m)).collect()),
    };
    let body = encode("sasl-mechanisms", &mechanisms).map_err(FrameError::from)?;
    write_all(io, &encode_raw(TYPE_SASL, 0, &body)).await?;

    let frame = read_frame(io, MIN_MAX_FRAME_SIZE * 8).await?;
    if frame.frame_type != TYPE_SASL {
        return Err(PreambleError::Sasl("expected a SASL frame".into()));
    }
    let len = encoded_len(&frame.body).map_err(FrameError::from)?;
    if descriptor_code(&frame.body) != Some(0x41) {
        return Err(PreambleError::Sasl("expected sasl-init".into()));
    }
    let init: SaslInit = decode("sasl-init", &frame.body[..len]).map_err(FrameError::from)?;
    let code = if MECHANISMS.contains(&init.mechanism.as_str()) {
        SaslCode::Ok
    } else {
        SaslCode::Auth
    };
    let ok = code == SaslCode::Ok;
    tracing::debug!(mechanism = init.mechanism.as_str(), ok, "SASL init.");
    let outcome = SaslOutcome {
        code,
        additional_data: None,
    };
    let body = encode("sasl-outcome", &outcome).map_err(FrameError::from)?;
    write_all(io, &encode_raw(TYPE_SASL, 0, &body)).await?;
    if !ok {
        return Err(PreambleError::Sasl(format!(
            "mechanism {} not offered",
            init.mechanism.as_str()
        )));
    }
    let header = read_header(io).await?;
    if header != AMQP_HEADER {
        return Err(PreambleError::BadHeader(header));
    }
    write_all(io, &AMQP_HEADER).await?;
    Ok(())
}
