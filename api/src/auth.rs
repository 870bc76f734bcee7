//! Tokens and scopes.
//!
//! A token is `qv_<id>_<secret>`. Only its SHA-256 is kept, in the catalog's `tokens`
//! document (see [`quiver_engine::catalog`]).
//! The admin token comes from `QUIVER_ADMIN_TOKEN` (never stored), or is generated on
//! first start, printed once, and stored hashed like any other.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use parking_lot::RwLock;
use quiver_engine::Store;
use quiver_engine::catalog::Document;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};

/// What a token may do. `Admin` implies the others.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, strum::EnumString,
)]
#[serde(rename_all = "lowercase")]
#[strum(
    serialize_all = "lowercase",
    parse_err_fn = unknown_scope,
    parse_err_ty = String
)]
pub enum Scope {
    /// Queries and subscriptions.
    Read,
    /// Writing events.
    Ingest,
    /// Everything, including DDL and tokens.
    Admin,
}

fn unknown_scope(other: &str) -> String {
    format!("unknown scope '{other}' (read, ingest, admin)")
}

/// A stored token (the secret is not kept).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// SHA-256 of the full token, hex.
    pub hash: String,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// When the token stops working, RFC 3339 (none: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl TokenRecord {
    /// The expiry instant, if any (an unreadable one counts as already passed).
    fn expiry(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.expires_at.as_deref().map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| t.to_utc())
                .unwrap_or(chrono::DateTime::UNIX_EPOCH)
        })
    }
}

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub(crate) token_id: String,
    /// The token's human name (`admin` for the environment's admin token).
    pub(crate) name: String,
    scopes: Vec<Scope>,
}

impl Principal {
    pub(crate) fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    pub(crate) fn require(&self, scope: Scope) -> ApiResult<()> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this token lacks the '{}' scope",
                serde_json::to_value(scope)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )))
        }
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The token registry.
#[derive(Debug)]
pub(crate) struct Tokens {
    /// The catalog's record of tokens (hashes only).
    document: Document<Vec<TokenRecord>>,
    records: RwLock<BTreeMap<String, TokenRecord>>,
    env_admin_hash: Option<String>,
}

/// A newly made token; `token` is the only time the secret exists.
#[derive(Debug, Serialize)]
pub(crate) struct NewToken {
    pub(crate) id: String,
    pub(crate) token: String,
    pub(crate) name: String,
    pub(crate) scopes: Vec<Scope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) expires_at: Option<String>,
}

/// A rotation's result: the new token, and when the old one stops working.
#[derive(Debug, Serialize)]
pub(crate) struct Rotated {
    #[serde(flatten)]
    pub(crate) token: NewToken,
    pub(crate) previous: RotatedFrom,
}

/// The token a rotation replaced.
#[derive(Debug, Serialize)]
pub(crate) struct RotatedFrom {
    pub(crate) id: String,
    pub(crate) expires_at: String,
}

fn new_secret() -> (String, String) {
    let id = hex::encode(rand::random::<[u8; 6]>());
    let token = format!("qv_{id}_{}", hex::encode(rand::random::<[u8; 20]>()));
    (id, token)
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `now + ttl`, refusing a lifetime too long to represent.
fn expiry_after(ttl: std::time::Duration) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let ttl =
        chrono::Duration::from_std(ttl).map_err(|_| anyhow::anyhow!("the lifetime is too long"))?;
    chrono::Utc::now()
        .checked_add_signed(ttl)
        .ok_or_else(|| anyhow::anyhow!("the lifetime is too long"))
}

impl Tokens {
    /// Loads the registry. Returns it and, when an admin token had to be generated, that token.
    pub(crate) async fn load(
        store: &Store,
        node: &str,
        env_admin: Option<String>,
    ) -> anyhow::Result<(Self, Option<NewToken>)> {
        let document = Document::new(store, "tokens", Some("_quiver/tokens.json"), node);
        let records = by_id(document.read().await?);
        let env_admin_hash = env_admin.filter(|t| !t.is_empty()).map(|t| sha256_hex(&t));
        let this = Self {
            document,
            records: RwLock::new(records),
            env_admin_hash,
        };
        let has_admin = this.env_admin_hash.is_some()
            || this
                .records
                .read()
                .values()
                .any(|r| r.scopes.contains(&Scope::Admin));
        let generated = if has_admin {
            None
        } else {
            Some(this.create("admin", vec![Scope::Admin], None).await?)
        };
        Ok((this, generated))
    }

    /// Makes a token, valid for `ttl` when given.
    pub(crate) async fn create(
        &self,
        name: &str,
        scopes: Vec<Scope>,
        ttl: Option<std::time::Duration>,
    ) -> anyhow::Result<NewToken> {
        let (id, token) = new_secret();
        let expires_at = ttl.map(expiry_after).transpose()?.map(rfc3339);
        let record = TokenRecord {
            id: id.clone(),
            name: name.to_owned(),
            scopes: scopes.clone(),
            hash: sha256_hex(&token),
            created_at: chrono::Utc::now().to_rfc3339(),
            expires_at: expires_at.clone(),
        };
        let ((), all) = self
            .document
            .update(|list| {
                list.push(record.clone());
                Ok(())
            })
            .await?;
        *self.records.write() = by_id(all);
        Ok(NewToken {
            id,
            token,
            name: name.to_owned(),
            scopes,
            expires_at,
        })
    }

    /// Replaces token `id` without downtime: a new token with the same name and scopes
    /// (valid for `ttl`, when given), while the old one keeps working for `grace` and
    /// then expires. Both changes are one catalog write. `None` if there is no such token.
    pub(crate) async fn rotate(
        &self,
        id: &str,
        grace: std::time::Duration,
        ttl: Option<std::time::Duration>,
    ) -> anyhow::Result<Option<Rotated>> {
        let (new_id, token) = new_secret();
        let expires_at = ttl.map(expiry_after).transpose()?.map(rfc3339);
        let grace_end = expiry_after(grace)?;
        let (rotated, all) = self
            .document
            .update(|list| {
                let Some(old) = list.iter_mut().find(|r| r.id == id) else {
                    return Ok(None);
                };
                // Never extend a token's life by rotating it.
                let until = rfc3339(old.expiry().map_or(grace_end, |at| at.min(grace_end)));
                old.expires_at = Some(until.clone());
                let record = TokenRecord {
                    id: new_id.clone(),
                    name: old.name.clone(),
                    scopes: old.scopes.clone(),
                    hash: sha256_hex(&token),
                    created_at: chrono::Utc::now().to_rfc3339(),
                    expires_at: expires_at.clone(),
                };
                let made = NewToken {
                    id: new_id.clone(),
                    token: token.clone(),
                    name: record.name.clone(),
                    scopes: record.scopes.clone(),
                    expires_at: expires_at.clone(),
                };
                list.push(record);
                Ok(Some(Rotated {
                    token: made,
                    previous: RotatedFrom {
                        id: id.to_owned(),
                        expires_at: until,
                    },
                }))
            })
            .await?;
        *self.records.write() = by_id(all);
        Ok(rotated)
    }

    /// Removes a token; false if there was none with that id.
    pub(crate) async fn delete(&self, id: &str) -> anyhow::Result<bool> {
        let (removed, all) = self
            .document
            .update(|list| {
                let before = list.len();
                list.retain(|r| r.id != id);
                Ok(list.len() != before)
            })
            .await?;
        *self.records.write() = by_id(all);
        Ok(removed)
    }

    /// Every stored token (without secrets).
    pub(crate) fn list(&self) -> Vec<TokenRecord> {
        self.records.read().values().cloned().collect()
    }

    /// Checks a presented token; the error says why it is refused.
    pub(crate) fn check(&self, token: &str) -> Result<Principal, String> {
        const INVALID: &str = "the token is not valid";
        let hash = sha256_hex(token);
        if self.env_admin_hash.as_deref() == Some(hash.as_str()) {
            return Ok(Principal {
                token_id: "env-admin".into(),
                name: "admin".into(),
                scopes: vec![Scope::Admin],
            });
        }
        let id = token
            .strip_prefix("qv_")
            .and_then(|t| t.split('_').next())
            .ok_or(INVALID)?;
        let records = self.records.read();
        let rec = records.get(id).ok_or(INVALID)?;
        // Both sides are hashes of secrets; comparing them leaks nothing useful.
        if rec.hash != hash {
            return Err(INVALID.into());
        }
        if let Some(at) = rec.expiry()
            && at <= chrono::Utc::now()
        {
            return Err(format!("the token expired at {}", rfc3339(at)));
        }
        Ok(Principal {
            token_id: rec.id.clone(),
            name: rec.name.clone(),
            scopes: rec.scopes.clone(),
        })
    }

    /// Authenticates the `Authorization: Bearer` header.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> ApiResult<Principal> {
        let value = headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing 'Authorization: Bearer <token>' header")
            })?;
        let value = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be 'Bearer <token>'")
            })?;
        self.check(token.trim()).map_err(ApiError::unauthorized)
    }
}

fn by_id(list: Vec<TokenRecord>) -> BTreeMap<String, TokenRecord> {
    list.into_iter().map(|r| (r.id.clone(), r)).collect()
}
