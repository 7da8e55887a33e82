//! The kernels and hook backends `cargo xtask vm-test` covers. `full` (the default of
//! `vm-test`) runs every cell; `quick` (what `cargo xtask test`, and so CI, runs) one backend
//! per kernel: under software emulation on 2 cores a backend takes 4-5 minutes, so the full
//! matrix's 7 cells beside the host tier would not fit CI's hour with margin.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Matrix {
    /// Every kernel with every backend listed for it.
    Full,
    /// One backend per kernel.
    Quick,
}

/// One Debian kernel and the backends run on it.
pub struct KernelCell {
    /// How the kernel is selected on the command line (`--kernel 5.10`).
    pub name: &'static str,
    pub release: &'static str,
    /// The suite whose `linux-image-amd64` names the kernel package.
    pub suite: &'static str,
    pub full: &'static [&'static str],
    pub quick: &'static [&'static str],
}

const ALL_BACKENDS: &[&str] = &["fentry", "kprobe", "tracepoint"];

pub const KERNELS: &[KernelCell] = &[
    KernelCell {
        name: "5.10",
        release: "Debian 11",
        suite: "bullseye",
        full: ALL_BACKENDS,
        // What `auto` picks here, forced: a fentry regression cannot hide behind auto's
        // fallback to kprobes. tcp_recvmsg's 6-argument prototype (before 5.19) is met here.
        quick: &["fentry"],
    },
    KernelCell {
        name: "6.1",
        release: "Debian 12",
        suite: "bookworm",
        full: ALL_BACKENDS,
        quick: &["fentry"],
    },
    KernelCell {
        name: "6.12",
        release: "Debian 12 backports",
        suite: "bookworm-backports",
        full: &["auto"],
        quick: &["auto"],
    },
];

impl KernelCell {
    /// The backends of this kernel in `matrix`; `CONNSCOPE_VM_BACKENDS` (space separated)
    /// overrides them for every kernel.
    pub fn backends(&self, matrix: Matrix) -> Vec<String> {
        if let Ok(list) = std::env::var("CONNSCOPE_VM_BACKENDS") {
            return list.split_whitespace().map(str::to_owned).collect();
        }
        let backends = match matrix {
            Matrix::Full => self.full,
            Matrix::Quick => self.quick,
        };
        backends.iter().map(|b| (*b).to_owned()).collect()
    }
}
