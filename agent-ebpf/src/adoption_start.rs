//! `connscope_adoption_start`: never attached. The agent runs it once with
//! `BPF_PROG_TEST_RUN` just before it attaches the hooks, so the adoption of a server end
//! whose receive was in flight then (`adopt::request_read_in_flight_at_start`) compares
//! the kernel's own clock with the kernel's own clock.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use connscope_common::PinSlot;

use crate::{maps::PIN_STATE, records::now_jiffies};

#[raw_tracepoint]
pub fn connscope_adoption_start(_ctx: RawTracePointContext) -> i32 {
    if let Some(slot) = PIN_STATE.get_ptr_mut(PinSlot::AdoptionStartJiffies as u32) {
        // SAFETY: an array slot, written only here and only by this one run.
        unsafe { *slot = now_jiffies() };
    }
    0
}
