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
    /// The `kernel_*` test binaries the quick matrix runs here (`None`: all of them).
    pub quick_binaries: Option<&'static [&'static str]>,
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
        quick_binaries: None,
    },
    KernelCell {
        name: "6.1",
        release: "Debian 12",
        suite: "bookworm",
        full: ALL_BACKENDS,
        quick: &["fentry"],
        quick_binaries: None,
    },
    KernelCell {
        name: "6.12",
        release: "Debian 12 backports",
        suite: "bookworm-backports",
        full: &["auto"],
        quick: &["auto"],
        // `auto` picks fentry here, as 6.1 runs it: the quick matrix proves this kernel's
        // verifier and layouts with the send, receive and protocol paths, and leaves the
        // lifecycle, connect and continuity binaries (each over 1.5 minutes under emulation)
        // to 5.10 and 6.1, which keeps CI within its hour. The full matrix runs them all.
        quick_binaries: Some(&["kernel_backend", "kernel_http", "kernel_protocols"]),
    },
];

impl KernelCell {
    /// The backends of this kernel in `matrix`; `CONNSCOPE_VM_BACKENDS` (space separated)
    /// overrides them for every kernel.
    /// Whether the `kernel_*` test binary `name` runs on this kernel in `matrix`.
    pub fn runs_binary(&self, matrix: Matrix, name: &str) -> bool {
        match (matrix, self.quick_binaries) {
            (Matrix::Quick, Some(names)) => names.contains(&name),
            _ => true,
        }
    }

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
