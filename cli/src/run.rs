//! Running one parsed command line: connect where the command needs a
//! coordinator, dispatch to its command group, print a failure as one
//! line on stderr, and answer the exit code (see [`crate::exit`]).

use weft_client::Client;

use crate::args::{Args, Command};
use crate::{admin, bench, demo, exit, local, map, task, token};

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
    let format = args.output;
    // Flags > environment > the `weft login` context.
    let context = token::Context::load();
    // The CA likewise: flags or environment, else the context's.
    let trust = args.trust().or_else(|| context.trust());
    let url = match (&context.coordinator, args.coordinator_given) {
        (Some(saved), false) => saved.clone(),
        _ => args.coordinator,
    };
    let token = token::resolve(args.token.as_deref(), args.token_file.as_deref(), &context)?;
    match args.command {
        Command::Login { url } => token::login(url, token, trust).await,
        Command::Local {
            nodes,
            slots,
            listen,
        } => local::run(listen, nodes, slots).await,
        Command::Demo { nodes, slots } => demo::run(nodes, slots).await,
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
                    call,
                    command,
                } => task::submit(&client, format, &opts, call, command).await,
                Command::Get { id } => task::get(&client, format, id).await,
                Command::Watch { id, from_seq } => task::watch(&client, format, id, from_seq).await,
                Command::Wait { id } => task::wait(&client, format, id).await,
                Command::Cancel { id } => task::cancel(&client, format, id).await,
                Command::List { state, limit } => task::list(&client, format, state, limit).await,
                Command::Nodes => admin::nodes(&client, format).await,
                Command::Drain { node, grace } => admin::drain(&client, format, &node, grace).await,
                Command::Info => admin::info(&client, format).await,
                Command::Token(command) => token::run(&client, format, command).await,
                Command::Map {
                    jobs,
                    keep_order,
                    opts,
                    command,
                } => map::run(&client, &opts, jobs, keep_order, command).await,
                Command::Local { .. }
                | Command::Demo { .. }
                | Command::Bench(_)
                | Command::Login { .. } => {
                    unreachable!("handled before connecting")
                }
            }
        }
    }
}

/// The error chain on one line (`context: cause: root`).
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}
