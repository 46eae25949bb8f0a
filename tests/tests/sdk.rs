//! Compatibility with the official `openai` Python SDK: `OpenAI` and `AzureOpenAI` clients,
//! chat stream and non-stream, embeddings, and a bad key raising `AuthenticationError`
//! (`tests/python/sdk_compat.py` against a real gateway process and mock backend).

use std::process::Command;
use tollgate_loadtest::mock::MockOpts;
use tollgate_tests::{Harness, key_for};

/// The SDK script passes every check against a running gateway.
#[tokio::test]
async fn openai_python_sdk() {
    // The venv of tests/python/requirements.txt holds the pinned openai SDK.
    let python = tollgate_tests::pyenv::python().unwrap();
    let h = Harness::new()
        .backend("ptu", MockOpts::default(), "api = \"azure\"\npriority = 1")
        .backend(
            "payg",
            MockOpts::default(),
            "api = \"openai\"\npriority = 2",
        )
        .consumer("sdk", "")
        .start()
        .await
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sdk_compat.py");
    let url = h.url(0);
    let key = key_for("sdk");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).arg(script).arg(url).arg(key).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}\ngateway log:\n{}",
        h.gateways[0].log_text()
    );
    assert!(stdout.contains("9 checks passed"), "{stdout}");
    let stats = h.mock("ptu").stats().await.unwrap();
    assert!(
        stats.ok >= 7,
        "PTU (priority 1) served the SDK's calls: {stats:?}"
    );
}
