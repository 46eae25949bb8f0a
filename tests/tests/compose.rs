//! The docker-compose deployment, checked without a Docker engine: `docker-compose.yml` parses
//! and has the services the design names (three gateway replicas behind nginx, Redis, an
//! OpenTelemetry collector exporting to Jaeger, a mock PTU and a mock PAYG); every build
//! context, Dockerfile and mounted config file exists; and the mounted configs agree with the
//! compose file (the gateway config validates and points at the compose services, nginx
//! proxies to the gateway service, the collector sends traces to Jaeger).

use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn services(c: &Value) -> &serde_yaml::Mapping {
    c["services"].as_mapping().expect("a services map")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The mounted host file of the volume whose container path is `target`.
fn mount(service: &Value, target: &str) -> PathBuf {
    let volumes = strings(&service["volumes"]);
    let v = volumes
        .iter()
        .find(|v| v.split(':').nth(1) == Some(target))
        .unwrap_or_else(|| panic!("no volume mounted at {target}: {volumes:?}"));
    root().join(v.split(':').next().unwrap())
}

/// Every service the design names is there, with three gateway replicas.
#[test]
fn compose_has_the_cluster_services() {
    let c = compose();
    let s = services(&c);
    let names: BTreeSet<&str> = s.keys().filter_map(Value::as_str).collect();
    for want in [
        "nginx",
        "gateway",
        "redis",
        "otel-collector",
        "jaeger",
        "mock-ptu",
        "mock-payg",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(want), "service {want} missing: {names:?}");
    }
    assert_eq!(s["gateway"]["deploy"]["replicas"].as_u64(), Some(3));
    assert!(strings(&s["nginx"]["depends_on"]).contains(&"gateway".to_string()));
    assert!(
        strings(&s["nginx"]["ports"])
            .iter()
            .any(|p| p.ends_with(":8080"))
    );
    assert!(strings(&s["otel-collector"]["depends_on"]).contains(&"jaeger".to_string()));
    let gw_deps = strings(&s["gateway"]["depends_on"]);
    for dep in ["redis", "otel-collector", "mock-ptu", "mock-payg"] {
        assert!(gw_deps.contains(&dep.to_string()), "gateway needs {dep}");
    }
    // The mocks run the mock binary from the same image, on the ports the gateway config uses.
    assert_eq!(strings(&s["mock-ptu"]["entrypoint"]), ["tollgate-mock"]);
    assert!(strings(&s["mock-ptu"]["command"]).contains(&"0.0.0.0:9001".to_string()));
    assert!(strings(&s["mock-ptu"]["command"]).contains(&"--tpm".to_string()));
    assert!(strings(&s["mock-payg"]["command"]).contains(&"0.0.0.0:9002".to_string()));
}

/// Every build context and Dockerfile exists; the Dockerfile is multi-stage and builds both
/// `tollgate` and `tollgate-mock` into a slim runtime image.
#[test]
fn build_contexts_and_dockerfile_exist() {
    let c = compose();
    let mut built = 0;
    for (name, svc) in services(&c) {
        let Some(build) = svc.get("build") else {
            assert!(
                svc.get("image").is_some(),
                "{name:?} has neither build nor image"
            );
            continue;
        };
        built += 1;
        let (context, dockerfile) = match build {
            Value::String(ctx) => (ctx.clone(), "Dockerfile".to_string()),
            b => (
                b["context"].as_str().unwrap_or(".").to_string(),
                b["dockerfile"].as_str().unwrap_or("Dockerfile").to_string(),
            ),
        };
        let ctx = root().join(&context);
        assert!(ctx.is_dir(), "{name:?}: build context {context} missing");
        assert!(
            ctx.join(&dockerfile).is_file(),
            "{name:?}: {dockerfile} missing"
        );
        assert!(
            ctx.join("Cargo.toml").is_file(),
            "{name:?}: the context must be the workspace"
        );
    }
    assert!(
        built >= 3,
        "the gateway and both mocks are built from the repo"
    );
    let df = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = df
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(stages[0].contains("rust:"), "a Rust builder stage first");
    let last = stages.last().unwrap();
    assert!(
        last.contains("slim") || last.contains("distroless"),
        "small runtime image: {last}"
    );
    for bin in ["--bin tollgate ", "--bin tollgate-mock", "--locked"] {
        assert!(df.contains(bin), "Dockerfile must build with {bin}");
    }
    assert!(df.contains("COPY --from=builder"));
}

/// The mounted configs exist and agree with the compose services.
#[test]
fn referenced_config_files_exist_and_agree() {
    let c = compose();
    let s = services(&c);
    // Every host path mounted by any service exists.
    for (name, svc) in s {
        for v in strings(&svc["volumes"]) {
            let host = v.split(':').next().unwrap();
            if host.starts_with('.') || host.starts_with('/') {
                assert!(
                    root().join(host).exists(),
                    "{name:?} mounts {host}, which does not exist"
                );
            }
        }
    }

    // The gateway config validates and names the compose services.
    let path = mount(&s["gateway"], "/etc/tollgate/tollgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = tollgate_common::Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let command = strings(&s["gateway"]["command"]).join(" ");
    assert!(command.contains("/etc/tollgate/tollgate.toml"), "{command}");
    assert!(config.store.url.contains("redis:6379"));
    assert_eq!(
        config.telemetry.otlp_endpoint.as_deref(),
        Some("http://otel-collector:4318")
    );
    let urls: Vec<&str> = config.backends.iter().map(|b| b.url.as_str()).collect();
    assert!(urls.contains(&"http://mock-ptu:9001"), "{urls:?}");
    assert!(urls.contains(&"http://mock-payg:9002"), "{urls:?}");
    let ptu = config
        .backends
        .iter()
        .find(|b| b.url.contains("mock-ptu"))
        .unwrap();
    let payg = config
        .backends
        .iter()
        .find(|b| b.url.contains("mock-payg"))
        .unwrap();
    assert!(ptu.priority < payg.priority, "PTU first, PAYG as overflow");
    for c in &config.consumers {
        if let Some(var) = &c.key_env {
            assert!(
                s["gateway"]["environment"].get(var.as_str()).is_some(),
                "the gateway's environment must set {var}"
            );
        }
    }

    // nginx proxies to the gateway service without buffering streams.
    let nginx = std::fs::read_to_string(mount(&s["nginx"], "/etc/nginx/nginx.conf")).unwrap();
    assert!(nginx.contains("server gateway:8080"), "{nginx}");
    assert!(nginx.contains("proxy_buffering off"));
    assert!(nginx.contains("listen 8080"));

    // The collector receives OTLP/HTTP on 4318 and sends traces to Jaeger.
    let col_path = mount(&s["otel-collector"], "/etc/otelcol/config.yaml");
    let col: Value = serde_yaml::from_str(&std::fs::read_to_string(&col_path).unwrap())
        .expect("collector config is valid YAML");
    assert_eq!(
        col["receivers"]["otlp"]["protocols"]["http"]["endpoint"].as_str(),
        Some("0.0.0.0:4318")
    );
    assert_eq!(
        col["exporters"]["otlp/jaeger"]["endpoint"].as_str(),
        Some("jaeger:4317")
    );
    let pipelines = &col["service"]["pipelines"];
    assert!(strings(&pipelines["traces"]["exporters"]).contains(&"otlp/jaeger".to_string()));
    for signal in ["traces", "metrics", "logs"] {
        assert!(
            strings(&pipelines[signal]["receivers"]).contains(&"otlp".to_string()),
            "{signal} pipeline receives OTLP"
        );
    }
}

/// Prometheus scrapes every gateway replica; Grafana is provisioned with it as the datasource
/// and loads the tollgate dashboard, whose panels query only that datasource.
#[test]
fn prometheus_and_grafana_are_provisioned() {
    let c = compose();
    let s = services(&c);
    let prom_path = mount(&s["prometheus"], "/etc/prometheus/prometheus.yml");
    let prom: Value = serde_yaml::from_str(&std::fs::read_to_string(&prom_path).unwrap()).unwrap();
    let job = &prom["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let sd = &job["dns_sd_configs"][0];
    assert_eq!(strings(&sd["names"]), ["gateway"], "every replica, by DNS");
    assert_eq!(sd["port"].as_u64(), Some(8080));

    let prov = mount(&s["grafana"], "/etc/grafana/provisioning");
    let ds: Value = serde_yaml::from_str(
        &std::fs::read_to_string(prov.join("datasources/prometheus.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(ds["datasources"][0]["type"].as_str(), Some("prometheus"));
    assert_eq!(
        ds["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let dashboards: Value = serde_yaml::from_str(
        &std::fs::read_to_string(prov.join("dashboards/tollgate.yaml")).unwrap(),
    )
    .unwrap();
    let dir = dashboards["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let dash_path = mount(&s["grafana"], &format!("{dir}/tollgate.json"));
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dash_path).unwrap()).unwrap();
    assert_eq!(dash["uid"], "tollgate");
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for p in panels {
        assert_eq!(p["datasource"]["type"], "prometheus", "{}", p["title"]);
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
}
