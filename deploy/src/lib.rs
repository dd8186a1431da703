//! Deployment assets live beside this crate: `local/` (the one-command local cluster), `docker/`
//! (the offline image build), `docker-compose.yml` and `k8s/`. Its one program is the
//! `shardline-health` probe (`src/bin`); its tests check the assets (`tests/assets.rs`).
