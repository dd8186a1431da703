//! Deployment assets live beside this crate: `local/` (the one-command local cluster).
//! The crate holds no logic; its tests check the assets (`tests/assets.rs`).
