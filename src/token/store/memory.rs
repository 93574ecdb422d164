//! The store of credentials whose tokens are persisted nowhere (AWS credentials): it keeps
//! nothing, and each process obtains its own after a start.

use async_trait::async_trait;

use super::{ChainKey, ChainState, Lease, StoreError, Stored, TokenStore};

pub struct MemoryOnly;

#[async_trait]
impl TokenStore for MemoryOnly {
    fn describe(&self) -> String {
        "memory only (persisted nowhere)".into()
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn load(&self, _key: &ChainKey) -> Result<Option<Stored>, StoreError> {
        Ok(None)
    }

    /// Always granted: the engine's own single flight is the only lock such a chain needs.
    async fn try_lease(&self, _key: &ChainKey) -> Result<Option<Lease>, StoreError> {
        Ok(Some(Lease {
            holder: "memory".into(),
            _hold: Box::new(()),
        }))
    }

    async fn save(
        &self,
        _key: &ChainKey,
        _lease: Option<&Lease>,
        expected: u64,
        _state: &ChainState,
    ) -> Result<Option<u64>, StoreError> {
        Ok(Some(expected + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_nothing() {
        let key = ChainKey {
            name: "aws".into(),
            identity: "id".into(),
            legacy: None,
        };
        let state = ChainState {
            refresh_token: Some(crate::secret::Secret::new("never-kept")),
            ..ChainState::default()
        };
        assert_eq!(
            MemoryOnly.save(&key, None, 0, &state).await.unwrap(),
            Some(1)
        );
        assert!(MemoryOnly.load(&key).await.unwrap().is_none());
    }
}
