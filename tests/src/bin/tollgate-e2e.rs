//! The `tollgate` binary, built inside the tests package so end-to-end tests can start real
//! gateway processes with `env!("CARGO_BIN_EXE_tollgate-e2e")`. It is the same one line as
//! `gateway/src/main.rs`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
