//! The `$cbs` node (§2): clients put SAS tokens, and the connection remembers which entity
//! paths they cover. Links to an entity are refused without a live token for it.

use fe2o3_amqp_types::primitives::SimpleValue;

use super::error::SbError;
use super::jwt;
use super::queue::{EntityRef, Namespace, strip_authority};
use super::request::Request;
use super::sas::{SasRule, verify};

/// Token types clients label their tokens with (§2).
const TOKEN_TYPES: [&str; 3] = ["servicebus.windows.net:sastoken", "jwt", "amqp:swt"];

/// Paths the connection holds tokens for.
#[derive(Debug, Default)]
pub struct Authz {
    /// (lower-case path without slashes at the ends, expiry in Unix seconds).
    grants: Vec<(String, i64)>,
}

impl Authz {
    /// Whether any token was granted on this connection.
    pub fn any(&self) -> bool {
        !self.grants.is_empty()
    }

    /// Whether a live token covers `entity` (a namespace-wide token covers everything; a
    /// queue's token covers its dead-letter sub-queue too).
    pub fn allows(&self, entity: &EntityRef, now_s: i64) -> bool {
        let path = entity.path().to_ascii_lowercase();
        self.grants
            .iter()
            .any(|(grant, exp)| *exp > now_s && covers(grant, &path))
    }

    /// Handles a put-token request; returns the CBS status code and description.
    pub fn put_token(
        &mut self,
        broker: &Namespace,
        rules: &[SasRule],
        accept_jwt: bool,
        req: &Request,
        now_s: i64,
    ) -> (i32, String) {
        match self.try_put_token(broker, rules, accept_jwt, req, now_s) {
            Ok(()) => (202, "Accepted".into()),
            Err(e) => (e.status(), e.to_string()),
        }
    }

    fn try_put_token(
        &mut self,
        broker: &Namespace,
        rules: &[SasRule],
        accept_jwt: bool,
        req: &Request,
        now_s: i64,
    ) -> Result<(), SbError> {
        if req.operation != "put-token" {
            return Err(SbError::Argument(format!(
                "unsupported $cbs operation {}",
                req.operation
            )));
        }
        // Python 7.15 labels SAS tokens `jwt` (its key credential takes the JWT path), so the
        // token's own form decides how it is checked, not the `type` property.
        match req.app_prop("type") {
            Some(SimpleValue::String(t)) if TOKEN_TYPES.contains(&t.as_str()) => {}
            Some(SimpleValue::String(t)) => {
                return Err(SbError::Unauthorized(format!(
                    "token type {t} is not accepted"
                )));
            }
            _ => return Err(SbError::Argument("put-token needs a type".into())),
        }
        let token = match &req.body {
            fe2o3_amqp_types::primitives::Value::String(s) => s.as_str(),
            _ => return Err(SbError::Argument("put-token body must be a string".into())),
        };
        let named = match req.app_prop("name") {
            Some(SimpleValue::String(name)) => Some(normalize(name)),
            _ => None,
        };
        let (path, expires_s) = if token.starts_with("SharedAccessSignature ") {
            let claims =
                verify(token, rules, now_s).map_err(|e| SbError::Unauthorized(e.to_string()))?;
            let path = normalize(&claims.audience);
            if named.as_ref().is_some_and(|n| !covers(&path, n)) {
                return Err(SbError::Unauthorized(
                    "the token's audience does not cover the name it was put for".into(),
                ));
            }
            (path, claims.expires_s)
        } else if accept_jwt {
            let exp = jwt::check(token, now_s).map_err(|e| SbError::Unauthorized(e.to_string()))?;
            let path = named.ok_or_else(|| SbError::Argument("put-token needs a name".into()))?;
            (path, exp)
        } else {
            return Err(SbError::Unauthorized(
                "only SAS tokens are accepted (JWT acceptance is switched off)".into(),
            ));
        };
        let entity_path = path.strip_suffix("/$management").unwrap_or(&path);
        if !entity_path.is_empty() && broker.resolve(entity_path).is_none() {
            return Err(SbError::EntityNotFound(entity_path.to_string()));
        }
        self.grants.push((entity_path.to_string(), expires_s));
        Ok(())
    }
}

fn normalize(uri: &str) -> String {
    strip_authority(uri).trim_matches('/').to_ascii_lowercase()
}

/// Whether a token for path `grant` covers `path`: the same path, a sub-path, or any path
/// for a namespace-wide (empty) grant.
fn covers(grant: &str, path: &str) -> bool {
    grant.is_empty()
        || path == grant
        || path
            .strip_prefix(grant)
            .is_some_and(|rest| rest.starts_with('/'))
}
