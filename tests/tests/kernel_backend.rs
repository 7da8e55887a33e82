//! Which hook backend the agent attached, as `connscope_probe_info` reports it. With
//! `CONNSCOPE_PROBE_BACKEND` set (the agent reads it too, so `cargo xtask vm-test` forces
//! each backend in turn), every forced hook must show exactly that backend; the tracepoint
//! backend shows `tp_btf` on kernels with BTF and `tracepoint` without.

use connscope_tests::{Agent, kernel_test};

const FORCED_HOOKS: [&str; 4] = ["tcp_connect", "tcp_close", "tcp_sendmsg", "tcp_recvmsg"];
const ATTACH_MODES: [&str; 4] = ["fentry", "kprobe", "tp_btf", "tracepoint"];
/// Lifecycle tracepoints and the tracepoint backend use BTF tracepoints when the kernel has BTF.
fn tracepoint_mode() -> &'static str {
    if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() { "tp_btf" } else { "tracepoint" }
}

kernel_test!(
    fn probe_info_shows_the_backend_in_use() -> anyhow::Result<()> {
        let forced =
            std::env::var("CONNSCOPE_PROBE_BACKEND").ok().filter(|b| !b.is_empty() && b != "auto");
        let agent = Agent::start(&[])?;
        let scrape = agent.scrape()?;
        for hook in FORCED_HOOKS {
            let modes: Vec<&str> = ATTACH_MODES
                .into_iter()
                .filter(|mode| {
                    scrape.sum("connscope_probe_info", &[("hook", hook), ("attach", mode)]) == 1.0
                })
                .collect();
            match &forced {
                // The tracepoint backend uses BTF tracepoints where it can, classic ones (or
                // syscall-exit counting before Linux 6.3) where it must.
                Some(backend) if backend == "tracepoint" => {
                    assert!(
                        modes == ["tp_btf"] || modes == ["tracepoint"],
                        "{hook}: {modes:?}: {}",
                        scrape.text
                    )
                }
                Some(backend) => assert_eq!(modes, [backend.as_str()], "{hook}: {}", scrape.text),
                None => {
                    assert_eq!(
                        modes.len(),
                        1,
                        "{hook} must have exactly one backend: {}",
                        scrape.text
                    )
                }
            }
            assert_eq!(
                scrape.sum("connscope_probe_info", &[("hook", hook)]),
                1.0,
                "{hook}: {}",
                scrape.text
            );
        }
        // The lifecycle source is the same tracepoint whatever the backend.
        assert_eq!(
            scrape.sum(
                "connscope_probe_info",
                &[("hook", "inet_sock_set_state"), ("attach", tracepoint_mode())]
            ),
            1.0,
            "{}",
            scrape.text
        );
        Ok(())
    }
);
