//! Carrying out a plan: a VM slot of this host first (waiting for one while all are held), then
//! a cold boot or a warm restore.

use super::cold;
use super::error::VmError;
use super::handle::Vm;
use super::plan::Plan;
use super::teardown::Held;
use super::warm;
use crate::host::slots;
use crate::model::spec::Start;

/// Runs `plan`: a ready VM, or an error that says what happened (with the kept artifacts once
/// the domain had started). First a VM slot of this host (waiting for one if all are held).
pub async fn run(plan: Plan) -> Result<Vm, VmError> {
    let slot = slots::acquire(
        plan.slots_dir.clone(),
        &plan.slots,
        plan.spec.name.clone(),
        plan.slot_group.clone(),
        plan.slot_budget,
    )
    .await?;
    let held: Vec<Held> = slot.into_iter().map(|s| Box::new(s) as Held).collect();
    match (plan.start, warm::cold_reason(&plan)) {
        (Start::Warm, None) => warm::start(&plan, held).await,
        (Start::Warm, Some(why)) => {
            tracing::info!("VM {}: starting cold, not warm: {why}", plan.spec.name);
            cold::boot(&plan, held).await
        }
        (Start::Cold, _) => cold::boot(&plan, held).await,
    }
}
