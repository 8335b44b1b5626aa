//! The `infinite-llm-loadgen` binary as the benches call it: `--json` on stdout, every request
//! accounted for even when no server answers, and bad flags refused.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_infinite-llm-loadgen");

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn json_report_counts_requests_nobody_answered() {
    let out = Command::new(BIN)
        .args(["--url", &format!("http://127.0.0.1:{}", closed_port())])
        .args([
            "--trace",
            "long",
            "--rate",
            "50",
            "--requests",
            "5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["requests"], 5);
    assert_eq!(report["ok"], 0);
    assert_eq!(report["failed"], 5);
    assert_eq!(report["failures"]["transport"], 5);
    assert_eq!(report["output_tokens_per_s"], 0.0);
    assert!(report["ttft_ms"]["p50"].is_null());
}

#[test]
fn bad_flags_are_refused() {
    for args in [
        &["--concurrency", "0"][..],
        &["--rate", "-1"],
        &["--url", "127.0.0.1:8000"],
        &["--trace", "medium"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }
}
