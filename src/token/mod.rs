//! Tokens: the token model and its schedule, the refresh-token store, and the per-credential
//! engine that keeps one valid token through a lock-free read path and a single-flight refresh.

pub mod credential;
pub mod exchange;
pub mod exchange_health;
pub mod jwt;
pub mod metrics;
pub mod model;
pub mod refresher;
pub mod store;
pub mod subject;

pub use credential::{Chain, Credential, StoreMode, Unavailable};
pub use exchange::Exchanger;
pub use model::Token;
pub use store::{ChainKey, ChainState, FileStore, TokenStore};
