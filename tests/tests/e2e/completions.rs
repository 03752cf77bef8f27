//! `weft completions SHELL`: a script the shell loads, completing weft's
//! commands and flags, printed without any coordinator or login.

use weft_tests::cli::run_weft;
use weft_tests::process::bin_path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bash_completes_weft_commands_and_flags_from_the_script() {
    // No coordinator anywhere: completions never dial one.
    let script = run_weft("", None, &["completions", "bash"], None).await;
    assert_eq!(script.code, Some(0), "{script}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("weft.bash");
    std::fs::write(&file, &script.stdout).unwrap();
    // What bash offers after `weft ca<TAB>` and `weft watch --<TAB>`.
    let complete = |words: &str, cword: usize| {
        format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _weft weft \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[@]}}\"",
            file.display()
        )
    };
    let bin_dir = bin_path("weft").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (words, cword, expected) in [
        ("weft ca", 1, &["call", "cancel"][..]),
        ("weft watch --", 2, &["--from-seq", "--help"][..]),
    ] {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(complete(words, cword))
            .env("PATH", &path)
            .output()
            .expect("bash runs");
        let offered = String::from_utf8_lossy(&out.stdout);
        for word in expected {
            assert!(
                offered.split_whitespace().any(|w| w == *word),
                "`{words}<TAB>` offers {offered:?}, not {word}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_shell_has_a_script_and_another_is_a_usage_error() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run_weft("", None, &["completions", shell], None).await;
        assert_eq!(out.code, Some(0), "{shell}: {out}");
        assert!(out.stdout.contains("weft"), "{shell}: {out}");
    }
    let out = run_weft("", None, &["completions", "tcsh"], None).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("possible values"), "{out}");
}
