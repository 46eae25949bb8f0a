//! The Kubernetes manifests (`deploy/k8s/`), checked without a cluster: every resource
//! validates against the Kubernetes API schemas (the `kubernetes-validate` package from the
//! tests' venv, strict, for a recent and an older Kubernetes); the ConfigMap's TOML is a valid
//! gateway config; the Deployment's probes, shutdown timing, config mount and resources fit the
//! gateway; every secret the config names (`*_env`) and `TOLLGATE_REDIS_URL` reach the
//! container from a Secret that holds them; the Service, PodDisruptionBudget and
//! HorizontalPodAutoscaler select the Deployment's pods.

use serde::Deserialize as _;
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use tollgate_common::Config;
use tollgate_common::config::BackendAuth;

/// Kubernetes versions the manifests must validate against: the newest schemas the package
/// ships and an older release still common in managed clusters.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.37.0", "1.30.0"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("deploy/k8s")
}

fn files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("deploy/k8s exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every YAML document of every manifest.
fn resources() -> Vec<Value> {
    let mut docs = Vec::new();
    for f in files() {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", f.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v:?}"))
}

fn container(docs: &[Value]) -> &Value {
    let c = &find(docs, "Deployment", "tollgate")["spec"]["template"]["spec"]["containers"];
    c.as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"].as_str() == Some("tollgate")))
        .expect("a container named tollgate")
}

/// The gateway config embedded in the ConfigMap.
fn config(docs: &[Value]) -> Config {
    let toml = s(&find(docs, "ConfigMap", "tollgate-config")["data"]["tollgate.toml"]);
    Config::from_toml(toml).unwrap_or_else(|e| panic!("the ConfigMap's tollgate.toml: {e}"))
}

/// The container port a probe or Service names (by name or number).
fn container_port(c: &Value, port: &Value) -> u64 {
    if let Some(p) = port.as_u64() {
        return p;
    }
    let name = s(port);
    c["ports"]
        .as_sequence()
        .and_then(|ps| ps.iter().find(|p| p["name"].as_str() == Some(name)))
        .map(|p| n(&p["containerPort"]))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// Every manifest validates, strictly (no unknown fields), against the Kubernetes API of each
/// version in [`KUBERNETES_VERSIONS`], and the validator saw every resource.
#[test]
fn manifests_validate_against_kubernetes_schemas() {
    let validate = tollgate_tests::pyenv::kubernetes_validate().unwrap();
    let docs = resources();
    assert!(docs.len() >= 7, "{} resources", docs.len());
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validate)
            .args(["--strict", "--kubernetes-version", version])
            .args(files())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "Kubernetes {version}:\n{text}");
        assert_eq!(
            text.matches(" passed for resource ").count(),
            docs.len(),
            "every resource validated against {version}:\n{text}"
        );
    }
}

/// The ConfigMap holds a valid gateway config that listens on the container's port, uses the
/// shared Redis store, and drains for 30 s on shutdown.
#[test]
fn configmap_is_a_valid_gateway_config() {
    let docs = resources();
    let config = config(&docs);
    assert_eq!(config.store.kind, tollgate_common::config::StoreKind::Redis);
    assert_eq!(config.server.shutdown_grace_ms, 30_000);
    let c = container(&docs);
    let port: u64 = config
        .server
        .listen
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(port, container_port(c, &"http".into()));
    assert!(
        config.server.listen.starts_with("0.0.0.0:"),
        "reachable from the pod network"
    );
    assert!(!config.consumers.is_empty() && !config.backends.is_empty());
}

/// Three replicas of `tollgate:latest` read the mounted config; readiness is `/readyz`,
/// liveness `/healthz`; a preStop hook precedes SIGTERM and the grace period covers it plus the
/// gateway's own drain (`server.shutdown_grace_ms`) with a margin; CPU and memory have
/// requests and limits.
#[test]
fn deployment_probes_shutdown_and_resources() {
    let docs = resources();
    let config = config(&docs);
    let deployment = find(&docs, "Deployment", "tollgate");
    assert_eq!(n(&deployment["spec"]["replicas"]), 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(&docs);
    assert_eq!(s(&c["image"]), "tollgate:latest");

    // The config file the args name is the ConfigMap's key, mounted where the args look.
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(s).collect();
    assert_eq!(args[0], "serve");
    let path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let (mount_dir, file) = path.rsplit_once('/').unwrap();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(mount_dir))
        .unwrap_or_else(|| panic!("nothing mounted at {mount_dir}"));
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(s(&volume["configMap"]["name"]), "tollgate-config");
    assert!(
        find(&docs, "ConfigMap", "tollgate-config")["data"]
            .get(file)
            .is_some()
    );

    let probe = |kind: &str| {
        let p = &c[kind]["httpGet"];
        (s(&p["path"]).to_string(), container_port(c, &p["port"]))
    };
    assert_eq!(probe("readinessProbe"), ("/readyz".to_string(), 8080));
    assert_eq!(probe("livenessProbe"), ("/healthz".to_string(), 8080));

    let pre_stop: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_sequence()
        .expect("a preStop exec hook")
        .iter()
        .map(s)
        .collect();
    assert_eq!(pre_stop[0], "sleep");
    let pre_stop_ms: u64 = pre_stop[1].parse::<u64>().unwrap() * 1000;
    let grace_ms = n(&pod["terminationGracePeriodSeconds"]) * 1000;
    let needed = pre_stop_ms + config.server.shutdown_grace_ms;
    assert!(
        grace_ms >= needed + 5_000,
        "grace {grace_ms} ms must cover preStop + drain ({needed} ms) with a margin"
    );
    assert!(
        grace_ms <= needed + 30_000,
        "grace {grace_ms} ms is far beyond the drain"
    );

    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][kind].get(res).is_some(),
                "resources.{kind}.{res} missing"
            );
        }
    }
}

/// Every environment variable the config names for a secret (consumer keys, backend
/// credentials) and `TOLLGATE_REDIS_URL` come from a Secret key that exists; no secret is
/// written into the Deployment itself.
#[test]
fn secrets_reach_every_env_the_config_names() {
    let docs = resources();
    let config = config(&docs);
    let mut wanted: Vec<String> = vec!["TOLLGATE_REDIS_URL".into()];
    wanted.extend(config.consumers.iter().filter_map(|c| c.key_env.clone()));
    for b in &config.backends {
        match &b.auth {
            BackendAuth::ApiKey { key_env, .. } => wanted.push(key_env.clone()),
            BackendAuth::Bearer { token_env } => wanted.push(token_env.clone()),
            BackendAuth::Oauth2ClientCredentials {
                client_secret_env, ..
            } => wanted.push(client_secret_env.clone()),
            BackendAuth::None | BackendAuth::AzureManagedIdentity { .. } => {}
        }
    }
    assert!(
        wanted.len() >= 4,
        "the example config uses secrets: {wanted:?}"
    );

    let env = container(&docs)["env"].as_sequence().unwrap();
    for var in &wanted {
        let entry = env
            .iter()
            .find(|e| e["name"].as_str() == Some(var))
            .unwrap_or_else(|| panic!("the container's env lacks {var}"));
        assert!(
            entry.get("value").is_none(),
            "{var} is written in the Deployment"
        );
        let r = &entry["valueFrom"]["secretKeyRef"];
        let secret = find(&docs, "Secret", s(&r["name"]));
        let key = s(&r["key"]);
        assert!(
            secret["stringData"].get(key).is_some() || secret["data"].get(key).is_some(),
            "Secret {} has no key {key} (for {var})",
            s(&r["name"])
        );
    }
}

/// The Service, the PodDisruptionBudget and the HorizontalPodAutoscaler all address the
/// Deployment's pods: the Service reaches the gateway's port, the budget keeps most replicas
/// up, the autoscaler scales the Deployment on CPU (whose request it needs) and never below
/// its replica count.
#[test]
fn service_pdb_and_hpa_select_the_gateway() {
    let docs = resources();
    let deployment = find(&docs, "Deployment", "tollgate");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let matches = |selector: &Value| {
        let selector = selector.as_mapping().expect("a selector");
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(matches(&deployment["spec"]["selector"]["matchLabels"]));

    let service = find(&docs, "Service", "tollgate");
    assert!(matches(&service["spec"]["selector"]));
    let c = container(&docs);
    let port = &service["spec"]["ports"][0];
    assert_eq!(container_port(c, &port["targetPort"]), 8080);

    let pdb = find(&docs, "PodDisruptionBudget", "tollgate");
    assert_eq!(s(&pdb["apiVersion"]), "policy/v1");
    assert!(matches(&pdb["spec"]["selector"]["matchLabels"]));
    let replicas = n(&deployment["spec"]["replicas"]);
    match (
        pdb["spec"].get("maxUnavailable"),
        pdb["spec"].get("minAvailable"),
    ) {
        (Some(max), None) => assert!(n(max) >= 1 && n(max) < replicas),
        (None, Some(min)) => assert!(n(min) >= 1 && n(min) < replicas),
        other => panic!("one of maxUnavailable / minAvailable: {other:?}"),
    }

    let hpa = find(&docs, "HorizontalPodAutoscaler", "tollgate");
    assert_eq!(s(&hpa["apiVersion"]), "autoscaling/v2");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(
        (s(&target["kind"]), s(&target["name"])),
        ("Deployment", "tollgate")
    );
    assert_eq!(n(&hpa["spec"]["minReplicas"]), replicas);
    assert!(n(&hpa["spec"]["maxReplicas"]) > replicas);
    let metrics = hpa["spec"]["metrics"].as_sequence().unwrap();
    assert!(
        metrics
            .iter()
            .any(|m| m["resource"]["name"].as_str() == Some("cpu")),
        "{metrics:?}"
    );
    assert!(c["resources"]["requests"].get("cpu").is_some());
}
