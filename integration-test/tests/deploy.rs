//! deploy/: manifests render, validate against real Kubernetes schemas, and only reference what
//! the agent really exports.

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kustomize_renders_and_the_base_passes_strict_schema_validation() {
    let base = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy/base")));
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Service",
    ] {
        assert!(
            base.contains(&format!("kind: {kind}\n")),
            "{kind} missing:\n{base}"
        );
    }
    assert!(
        base.contains(
            "add:\n            - BPF\n            - PERFMON\n            - NET_ADMIN\n            drop:\n            - ALL"
        ),
        "{base}"
    );
    assert!(!base.contains("privileged: true"));
    // The agent under its own seccomp profile, which an init container puts where the kubelet
    // reads Localhost profiles.
    assert!(
        base.contains("localhostProfile: observer/observer.json\n            type: Localhost"),
        "{base}"
    );
    assert!(!base.contains("type: Unconfined"), "{base}");
    let file = std::env::temp_dir().join(format!("observer-deploy-{}.yaml", std::process::id()));
    std::fs::write(&file, &base).unwrap();
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&file));
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.matches("passed").count(), 7, "{out}");

    let overlay = run(Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy/overlays/prometheus-operator")));
    assert!(overlay.contains("kind: PodMonitor"));
}

#[test]
fn prometheus_scrape_config_is_valid() {
    let out = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(root().join("deploy/prometheus/scrape.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/observer-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exported = std::fs::read_to_string(root().join("observer/src/export/metrics.rs")).unwrap();
    let exprs: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap())
        })
        .collect();
    assert!(exprs.len() >= 5);
    for e in exprs {
        for name in e
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("observer_"))
        {
            assert!(
                exported.contains(&format!("\"{name}\"")),
                "dashboard queries {name}, which the agent does not export"
            );
        }
    }
}
