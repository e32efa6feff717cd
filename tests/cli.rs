//! The binary as an operator uses it: `check` and `serve` on good and broken configs.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_bureau-guard");

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config.example.toml")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("BUREAU_GUARD_CONFIG").output().expect("run bureau-guard")
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bureau-guard-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_example_config() {
    let out = run(&["check", "--config", example().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("OK (3 tenants, 2 routes"), "{stdout}");
}

#[test]
fn check_prints_every_problem_with_its_path_and_exits_1() {
    let text = std::fs::read_to_string(example()).unwrap();
    let broken = text
        .replacen("max_body = \"64KiB\"", "max_body = \"64 lumps\"", 1)
        .replacen("response_timeout = \"5s\"", "response_timeout = \"soon\"", 1)
        .replacen("url = \"http://127.0.0.1:8081\"", "url = \"http://exa mple\"", 1)
        .replacen("id = \"bank-b\"", "id = \"bank-a\"", 1)
        .replacen("80ba50f74654537710bf8123964ee375dbff7c6cc3bf6db470ab760ecd8bd336", "80ba50", 1);
    let path = write_temp("broken.toml", &broken);
    let out = run(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for expected in [
        "5 problem(s)",
        "  server.max_body: invalid size \"64 lumps\"",
        "  upstream.response_timeout: invalid duration \"soon\"",
        "  upstream.url: unparsable URL \"http://exa mple\"",
        "  tenants[1].id: duplicate tenant id \"bank-a\" (also tenants[0])",
        "  tenants[2].api_key_sha256: expected 64 hex characters",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
}

#[test]
fn check_reports_unknown_keys_and_unreadable_files() {
    let path = write_temp("unknown.toml", "[server]\nlisten = \"127.0.0.1:1\"\nmax_bodee = \"1KiB\"\n");
    let out = run(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("server.max_bodee: unknown field `max_bodee`"), "{stdout}");
    assert!(stdout.contains("(line 3)"), "{stdout}");

    let out = run(&["check", "--config", "/nonexistent/bureau-guard.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot read /nonexistent/bureau-guard.toml"));
}

#[test]
fn serve_refuses_a_bad_config_before_binding_anything() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replacen("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:{port}\""), 1)
        .replacen("weight = 2", "weight = -2", 1);
    let path = write_temp("bad-serve.toml", &text);
    let out = run(&["serve", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tenants[0].weight: -2 must be between 1 and 1000"), "{stderr}");
    assert!(stderr.contains("not starting"), "{stderr}");
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "the port was never bound");
}

#[test]
fn check_refuses_a_config_without_an_admin_token_and_says_what_to_set() {
    let text = std::fs::read_to_string(example()).unwrap();
    let start = text.find("token_sha256 = ").expect("the example sets a token");
    let end = start + text[start..].find('\n').unwrap();
    let path = write_temp("no-admin-token.toml", &format!("{}{}", &text[..start], &text[end..]));
    let out = run(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for want in ["admin: no admin token", "admin.token_sha256", "admin.token_env", "admin.insecure_no_token = true"] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
