//! The `tollgate` binary: parses the command line and hands over to [`tollgate::cli`].

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
