//! Confirmations of finalized batches: the master keeps every committed batch in its catalog
//! until the leaf that holds it says the rows are visible; this loop says so, in the
//! background, for the batches the store lists as finalized.

use crate::client::MasterClient;

/// How often the leaf tells the master which committed batches it made visible.
const CONFIRM_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// Batches confirmed in one call (and one Raft entry) at most.
const CONFIRM_PER_CALL: usize = 1000;

/// Tells the master, in the background, which committed batches this leaf made visible, so
/// the catalog forgets them (it keeps every committed batch until then: a leaf that restarts
/// with one still prepared must hear "committed"). A batch leaves the store's `finalized` list
/// only once the master has applied the confirmation; a failed call is tried again later.
pub async fn confirm_finalized_loop(
    store: crate::store::Store,
    mut client: MasterClient,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(CONFIRM_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let keys = match store.finalized_batches(CONFIRM_PER_CALL) {
            Ok(k) if k.is_empty() => continue,
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("cannot read the finalized batches: {e}");
                continue;
            }
        };
        // The finalizes durable first: once the master forgets a batch, a restart must not
        // find it prepared again (it would ask, hear nothing, and abort committed rows).
        if let Err(e) = store.flush().await {
            tracing::warn!("cannot make finalized batches durable before confirming them: {e}");
            continue;
        }
        let batches: Vec<proto::ResolveBatchRequest> = keys
            .iter()
            .map(|k| proto::ResolveBatchRequest {
                pipeline_id: k.pipeline_id,
                task_id: k.task_id,
                epoch: k.epoch,
                seq: k.seq,
            })
            .collect();
        let sent = client
            .call(|mut c| {
                let batches = batches.clone();
                async move {
                    c.confirm_finalized(proto::ConfirmFinalizedRequest { batches })
                        .await
                }
            })
            .await;
        match sent {
            Ok(_) => {
                if let Err(e) = store.forget_finalized(&keys) {
                    tracing::warn!("cannot forget confirmed batches: {e}");
                }
            }
            Err(e) => tracing::debug!("cannot confirm finalized batches yet: {e}"),
        }
    }
}
