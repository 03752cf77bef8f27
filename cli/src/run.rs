//! Running one parsed command line: connect where the command needs a
//! coordinator, dispatch to its command group, print a failure as one
//! line on stderr, and answer the exit code (see [`crate::exit`]).

use weft_client::Client;

use crate::args::{Args, Command, NodesCommand};
use crate::{admin, bench, demo, exit, local, map, schedule, task, token, top};

/// Runs the command line in `args` and answers the exit code. Errors are
/// printed here, as one line on stderr.
pub async fn run(args: Args) -> u8 {
    match dispatch(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("weft: error: {}", one_line(&err));
            exit::for_error(&err)
        }
    }
}

async fn dispatch(args: Args) -> anyhow::Result<u8> {
    if let Command::Completions { shell } = args.command {
        // Before credentials: a shell's start-up must not depend on a login.
        return completions(shell);
    }
    let format = args.output;
    let (url, trust, token) = credentials(&args, token::Context::load())?;
    match args.command {
        Command::Login { url } => token::login(url, token, trust).await,
        Command::Local {
            nodes,
            slots,
            listen,
        } => local::run(listen, nodes, slots, format).await,
        Command::Demo { nodes, slots } => demo::run(nodes, slots, format).await,
        // Dials itself: a coordinator that is down is shown, not an error.
        Command::Top { interval } => top::run(url, trust, token, interval, format).await,
        Command::Bench(mut bench_args) => {
            bench_args.trust = trust;
            let external = args.coordinator_given.then_some(url);
            bench::run(bench_args, external, token, format).await
        }
        command => {
            let client = Client::connect_secure(&url, trust.as_ref(), token.as_deref()).await?;
            match command {
                Command::Run { opts, command } => {
                    task::run(&client, format, &opts.interactive(), command).await
                }
                Command::Call {
                    opts,
                    handler,
                    input,
                } => task::call(&client, format, &opts.interactive(), handler, input).await,
                Command::Submit {
                    opts,
                    deps,
                    call,
                    command,
                } => match &deps.file {
                    Some(_) if call.is_some() || !command.is_empty() || deps.is_set() => {
                        Err(exit::UsageError(
                            "-f FILE submits the file's tasks: give no command, --call or --after/--ref/--at/--delay with it"
                                .into(),
                        )
                        .into())
                    }
                    // Task flags were refused with -f when parsed; the
                    // trace to continue (TRACEPARENT) goes to every task.
                    Some(path) => {
                        crate::job::submit_file(&client, format, path, opts.trace()).await
                    }
                    None => task::submit(&client, format, &opts, &deps, call, command).await,
                },
                Command::Job(command) => crate::job::run(&client, format, command).await,
                Command::Get { id } => task::get(&client, format, id).await,
                Command::Watch { id, from_seq } => task::watch(&client, format, id, from_seq).await,
                Command::Wait { id } => task::wait(&client, format, id).await,
                Command::Cancel { id } => task::cancel(&client, format, id).await,
                Command::List(filters) => task::list(&client, format, filters).await,
                Command::Nodes { command: None } => admin::nodes(&client, format).await,
                Command::Nodes {
                    command: Some(NodesCommand::Revoke { node }),
                } => admin::revoke(&client, format, &node).await,
                Command::Drain { node, grace } => admin::drain(&client, format, &node, grace).await,
                Command::Info => admin::info(&client, format).await,
                Command::Token(command) => token::run(&client, format, command).await,
                Command::Schedule(command) => schedule::run(&client, format, command).await,
                Command::Limit(command) => crate::limit::run(&client, format, command).await,
                Command::Map {
                    jobs,
                    keep_order,
                    opts,
                    call,
                    command,
                } => {
                    let work = match call {
                        Some(handler) => map::Work::Call(handler),
                        None => map::Work::Exec(command),
                    };
                    map::run(&client, format, &opts, jobs, keep_order, work).await
                }
                Command::Local { .. }
                | Command::Demo { .. }
                | Command::Bench(_)
                | Command::Completions { .. }
                | Command::Top { .. }
                | Command::Login { .. } => {
                    unreachable!("handled before connecting")
                }
            }
        }
    }
}

/// `weft completions SHELL`: the script on stdout. Made in memory first:
/// clap_complete panics on a write error, and a reader that closed early
/// (`| head`) is no error worth a message.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<u8> {
    use std::io::Write;
    let mut command = <Args as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "weft", &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing the completion script"))
        }
        _ => Ok(0),
    }
}

/// The coordinator URL, trust and token a command uses: flags >
/// environment > the `weft login` context. The context's token and CA
/// belong to the context's coordinator: they are used only when the
/// command dials that coordinator (for `weft login URL`, when URL is it).
/// `weft local` and `weft demo` start their own cluster and dial no other:
/// they read no token or CA (a stale `WEFT_TOKEN_FILE` must not stop them).
fn credentials(
    args: &Args,
    context: token::Context,
) -> anyhow::Result<(String, Option<weft_client::Trust>, Option<String>)> {
    if let Command::Local { .. } | Command::Demo { .. } = args.command {
        return Ok((args.coordinator.clone(), None, None));
    }
    let url = match (&context.coordinator, args.coordinator_given) {
        (Some(saved), false) => saved.clone(),
        _ => args.coordinator.clone(),
    };
    let target = match &args.command {
        Command::Login { url } => url,
        _ => &url,
    };
    let context = context.for_coordinator(target);
    let trust = args.trust().or_else(|| context.trust());
    let token = token::resolve(args.token.as_deref(), args.token_file.as_deref(), &context)?;
    Ok((url, trust, token))
}

/// The error chain on one line (`context: cause: root`). A coordinator's
/// NotFound that already says "not found" is not prefixed again.
fn one_line(err: &anyhow::Error) -> String {
    let causes: Vec<String> = err
        .chain()
        .map(|cause| match cause.downcast_ref::<weft_client::Error>() {
            Some(weft_client::Error::NotFound(message)) if message.contains("not found") => {
                message.clone()
            }
            _ => cause.to_string(),
        })
        .collect();
    causes.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn saved() -> token::Context {
        token::Context {
            coordinator: Some("https://a.test:7070".into()),
            token: Some("weft_saved".into()),
            ca_file: Some("/a/ca.pem".into()),
            ca_pin: None,
        }
    }

    fn args(line: &[&str], coordinator_given: bool) -> Args {
        let mut args = Args::try_parse_from(line).unwrap();
        args.coordinator_given = coordinator_given;
        args
    }

    #[test]
    fn a_not_found_error_says_not_found_once() {
        let gone = anyhow::Error::new(weft_client::Error::NotFound(
            "task 01ARZ3NDEKTSV4RRFFQ69G5FAV not found".into(),
        ));
        assert_eq!(one_line(&gone), "task 01ARZ3NDEKTSV4RRFFQ69G5FAV not found");
        let gone = gone.context("cancelling task 01ARZ3NDEKTSV4RRFFQ69G5FAV");
        assert_eq!(
            one_line(&gone),
            "cancelling task 01ARZ3NDEKTSV4RRFFQ69G5FAV: task 01ARZ3NDEKTSV4RRFFQ69G5FAV not found"
        );
        let other = anyhow::Error::new(weft_client::Error::NotFound("no node x".into()));
        assert_eq!(one_line(&other), "not found: no node x");
    }

    #[test]
    fn the_saved_token_and_ca_go_to_the_saved_coordinator_only() {
        // No --coordinator: the context's coordinator, token and CA.
        let (url, trust, token) = credentials(&args(&["weft", "info"], false), saved()).unwrap();
        assert_eq!(url, "https://a.test:7070");
        assert_eq!(token.as_deref(), Some("weft_saved"));
        assert!(trust.is_some());
        // The same coordinator spelled without the scheme: still it.
        let line = ["weft", "--coordinator", "a.test:7070", "info"];
        let (_, trust, token) = credentials(&args(&line, true), saved()).unwrap();
        assert_eq!(token.as_deref(), Some("weft_saved"));
        assert!(trust.is_some());
        // Another coordinator (flag or WEFT_COORDINATOR): neither.
        for other in ["http://b.test:7070", "https://a.test:7071", "b.test:7070"] {
            let line = ["weft", "--coordinator", other, "info"];
            let (url, trust, token) = credentials(&args(&line, true), saved()).unwrap();
            assert_eq!(url, other);
            assert_eq!(token, None, "{other}");
            assert!(trust.is_none(), "{other}");
        }
        // An explicit token still goes where it is sent.
        let line = [
            "weft",
            "--coordinator",
            "b.test:7070",
            "--token",
            "weft_t",
            "info",
        ];
        let (_, _, token) = credentials(&args(&line, true), saved()).unwrap();
        assert_eq!(token.as_deref(), Some("weft_t"));
    }

    #[test]
    fn a_saved_list_of_coordinators_keeps_its_token_for_the_same_list_only() {
        let context = || token::Context {
            coordinator: Some("https://a.test:7070,https://b.test:7070".into()),
            ..saved()
        };
        let (url, _, token) = credentials(&args(&["weft", "info"], false), context()).unwrap();
        assert_eq!(url, "https://a.test:7070,https://b.test:7070");
        assert_eq!(token.as_deref(), Some("weft_saved"));
        let line = ["weft", "--coordinator", "a.test:7070, b.test:7070", "info"];
        let (_, _, token) = credentials(&args(&line, true), context()).unwrap();
        assert_eq!(token.as_deref(), Some("weft_saved"));
        let line = ["weft", "--coordinator", "a.test:7070", "info"];
        let (_, _, token) = credentials(&args(&line, true), context()).unwrap();
        assert_eq!(token, None, "one of the list is another context");
    }

    #[test]
    fn local_and_demo_read_no_token_file() {
        let missing = "/nonexistent/weft-token";
        for command in ["local", "demo"] {
            let line = ["weft", "--token-file", missing, command];
            let (_, trust, token) = credentials(&args(&line, false), saved()).unwrap();
            assert_eq!((token, trust.is_none()), (None, true), "{command}");
        }
        let line = ["weft", "--token-file", missing, "info"];
        let err = credentials(&args(&line, false), saved()).unwrap_err();
        assert!(err.to_string().contains("token file"), "{err}");
    }

    #[test]
    fn login_to_a_new_coordinator_does_not_reuse_the_saved_token() {
        let line = ["weft", "login", "http://b.test:7070"];
        let (_, trust, token) = credentials(&args(&line, false), saved()).unwrap();
        assert_eq!(token, None);
        assert!(trust.is_none());
        let line = ["weft", "login", "https://a.test:7070"];
        let (_, trust, token) = credentials(&args(&line, false), saved()).unwrap();
        assert_eq!(token.as_deref(), Some("weft_saved"));
        assert!(trust.is_some());
    }
}
