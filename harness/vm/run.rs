//! Carrying out a plan: a VM slot of this host first (waiting for one while all are held), then
//! a cold boot or a warm restore.

use super::cold;
use super::error::{VmError, WarmError};
use super::handle::Vm;
use super::plan::Plan;
use super::start;
use super::teardown::Held;
use super::warm;
use crate::host::slots;
use crate::model::spec::Start;
use crate::support::lock::FileLock;
use std::sync::Arc;

/// Runs `plan`: a ready VM, or an error that says what happened (with the kept artifacts once
/// the domain had started). First a VM slot of this host (waiting for one if all are held).
///
/// A warm start whose saved VM turns out broken (it does not restore, or its clone does not
/// come back within the restore budget) deletes it and boots cold instead, saying so.
pub async fn run(plan: Plan) -> Result<Vm, VmError> {
    // The name first: a name in use fails at once, without waiting for a slot.
    let claim = Arc::new(start::claim(&plan).await?);
    let held = async || held(&plan, &claim).await;
    match (plan.start, warm::cold_reason(&plan)) {
        (Start::Warm, None) => match Box::pin(warm::start(&plan, held().await?)).await {
            Err(VmError::Warm(e @ (WarmError::Broken { .. } | WarmError::Restore { .. }))) => {
                tracing::warn!("VM {}: starting cold instead: {e}", plan.spec.name);
                Box::pin(cold::boot(&plan, held().await?)).await
            }
            other => other,
        },
        (Start::Warm, Some(why)) => {
            tracing::info!("VM {}: starting cold, not warm: {why}", plan.spec.name);
            Box::pin(cold::boot(&plan, held().await?)).await
        }
        (Start::Cold, _) => Box::pin(cold::boot(&plan, held().await?)).await,
    }
}

/// What a start of `plan` holds until its VM is gone: the claim on its name, and a VM slot of
/// this host (none when its test goes over the count).
async fn held(plan: &Plan, claim: &Arc<FileLock>) -> Result<Vec<Held>, VmError> {
    let slot = slots::acquire(
        plan.slots_dir.clone(),
        &plan.slots,
        plan.spec.name.clone(),
        plan.slot_group.clone(),
        plan.slot_budget,
    )
    .await?;
    let mut held: Vec<Held> = vec![Box::new(claim.clone())];
    held.extend(slot.map(|s| Box::new(s) as Held));
    Ok(held)
}
