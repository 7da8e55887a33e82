//! Basic auth against bcrypt hashes, with verdicts cached: bcrypt costs tens of milliseconds
//! by design, and Prometheus sends the same credentials on every scrape.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use base64::Engine as _;
use ring::digest::{SHA256, digest};

/// Cached verdicts beyond this are dropped (wrong guesses must not grow memory without end).
const CACHE_LIMIT: usize = 1024;

#[derive(Debug, Default)]
pub struct AuthCache {
    /// SHA-256 of (user, hash, password) to verdict: the password itself is never kept.
    verdicts: Mutex<HashMap<[u8; 32], bool>>,
}

/// `user:password` from an `Authorization: Basic ...` header value.
pub fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let encoded = header.strip_prefix(b"Basic ").or_else(|| header.strip_prefix(b"basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

impl AuthCache {
    /// The verdict if already known (cheap: no bcrypt).
    pub fn cached(
        &self,
        users: &BTreeMap<String, String>,
        user: &str,
        password: &str,
    ) -> Option<bool> {
        let key = cache_key(user, users.get(user)?, password);
        self.verdicts.lock().ok()?.get(&key).copied()
    }

    /// Checks the password with bcrypt (slow: call off the async threads) and caches the verdict.
    pub fn verify(&self, users: &BTreeMap<String, String>, user: &str, password: &str) -> bool {
        let Some(hash) = users.get(user) else {
            // Unknown user: spend the same time as for a known one, so timing does not tell.
            if let Some(any_hash) = users.values().next() {
                let _ = bcrypt::verify(password, any_hash);
            }
            return false;
        };
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if let Ok(mut verdicts) = self.verdicts.lock() {
            if verdicts.len() >= CACHE_LIMIT {
                verdicts.clear();
            }
            verdicts.insert(cache_key(user, hash, password), ok);
        }
        ok
    }
}

fn cache_key(user: &str, hash: &str, password: &str) -> [u8; 32] {
    let mut input = Vec::with_capacity(user.len() + hash.len() + password.len() + 24);
    for part in [user, hash, password] {
        input.extend_from_slice(&(part.len() as u64).to_le_bytes());
        input.extend_from_slice(part.as_bytes());
    }
    let mut key = [0; 32];
    key.copy_from_slice(digest(&SHA256, &input).as_ref());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `htpasswd -nbB prometheus secret` (apache2-utils 2.4).
    const HTPASSWD_HASH: &str = "$2y$05$zMSuXhWd2SxYuo.1QJMXqekXwIeWpzDf3Z/A6Lk81Uqx6X4D0gYW2";

    #[test]
    fn htpasswd_hashes_verify_and_verdicts_are_cached() {
        let users = BTreeMap::from([("prometheus".to_owned(), HTPASSWD_HASH.to_owned())]);
        let cache = AuthCache::default();
        assert_eq!(cache.cached(&users, "prometheus", "secret"), None);
        assert!(cache.verify(&users, "prometheus", "secret"));
        assert_eq!(cache.cached(&users, "prometheus", "secret"), Some(true));
        assert!(!cache.verify(&users, "prometheus", "wrong"));
        assert_eq!(cache.cached(&users, "prometheus", "wrong"), Some(false));
        assert!(!cache.verify(&users, "nobody", "secret"));
        assert_eq!(cache.cached(&users, "nobody", "secret"), None);
    }

    #[test]
    fn basic_header_forms() {
        // "prometheus:se:cret": the password may hold colons.
        assert_eq!(
            basic_credentials(b"Basic cHJvbWV0aGV1czpzZTpjcmV0"),
            Some(("prometheus".into(), "se:cret".into()))
        );
        assert_eq!(basic_credentials(b"Bearer abc"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
        assert_eq!(basic_credentials(b"Basic bm9jb2xvbg=="), None);
    }
}
