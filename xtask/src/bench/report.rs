//! The printed summary of `target/bench/report.json`.

use serde_json::Value;

pub fn print_table(report: &Value) {
    println!("\nconnscope benchmark ({})", report["machine"]["kernel"].as_str().unwrap_or("?"));
    println!("{:-<96}", "");
    for key in ["throughput_keepalive", "throughput_close"] {
        let t = &report[key];
        println!(
            "{:<22} without {:>8} req/s  with {:>8} req/s  ratio {:.3} (min {:.3}, max {:.3})  goal >= {}  {}",
            t["mode"].as_str().unwrap_or(""),
            t["median_without_rps"],
            t["median_with_rps"],
            t["ratio_median"].as_f64().unwrap_or(0.0),
            t["ratio_min"].as_f64().unwrap_or(0.0),
            t["ratio_max"].as_f64().unwrap_or(0.0),
            t["goal"],
            if t["goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" }
        );
        println!(
            "{:<22} agent CPU {} s per 10k {}; events lost {} {}",
            "",
            t["agent_cpu_seconds_per_10k"],
            t["agent_cpu_per_10k_unit"].as_str().unwrap_or(""),
            t["events_lost_total"],
            t["events_lost"]
        );
    }
    println!("{:-<96}", "");
    if let Some(programs) = report["bpf_programs"].as_object() {
        for (name, p) in programs {
            println!(
                "{:<32} {:>10} runs {:>8} ns/run  goal <= {} ns ({})  {}",
                name,
                p["runs"],
                p["ns_per_run"],
                p["goal_ns"],
                p["kind"].as_str().unwrap_or(""),
                if p["goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" }
            );
        }
    }
    println!("{:-<96}", "");
    let m = &report["memory"];
    println!(
        "{} idle connections ({} sockets tracked): agent RSS {:.1} MiB (goal <= 30: {}), CONNS map {} B per tracked socket ({} B per slot; all maps {} B) goal <= 200: {}",
        m["connections"],
        m["sockets_tracked"],
        m["agent_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        if m["rss_goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" },
        m["conns_map_bytes_per_tracked_connection"],
        m["conns_map_bytes_per_slot"],
        m["all_maps_bytes_per_tracked_connection"],
        if m["kernel_bytes_goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" },
    );
    let e = &report["metrics_endpoint"];
    println!(
        "/metrics with {} servers x {} processes: {} samples, {} bytes, median {} ms, max {} ms (goal <= 10 ms: {})",
        e["servers"],
        e["processes"],
        e["samples"],
        e["body_bytes"],
        e["latency_ms_median"],
        e["latency_ms_max"],
        if e["goal_met"].as_bool() == Some(true) { "met" } else { "NOT met" }
    );
}
