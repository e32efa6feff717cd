fn main() -> std::process::ExitCode {
    bureau_guard::cli::main()
}
