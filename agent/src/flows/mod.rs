//! `connscope flows`: a running agent's flows in the terminal, sorted by churn. Reads the
//! agent's `/metrics` twice, `--interval` apart, and prints what happened in between.

mod client;
mod render;
pub mod stats;

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use self::client::{ClientArgs, MetricsClient};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    /// The agent's address (`/metrics` is added when no path is given).
    #[arg(long, env = "CONNSCOPE_FLOWS_URL", default_value = "http://localhost:9477")]
    pub url: String,

    /// Seconds between the two scrapes that rates come from; 0: one scrape, totals since the
    /// agent started.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    pub interval: f64,

    /// Refresh every N seconds (rates over the last N seconds) until interrupted.
    #[arg(long, value_name = "N", value_parser = positive_seconds)]
    pub watch: Option<f64>,

    /// `table` for people, `json` for scripts (one JSON document per refresh).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,

    #[command(flatten)]
    pub client: ClientArgs,
}

fn seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && (0.0..=86_400.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("{value:?} is not a number of seconds between 0 and 86400")),
    }
}

fn positive_seconds(value: &str) -> Result<f64, String> {
    seconds(value).and_then(|s| if s > 0.0 { Ok(s) } else { Err("must be above 0".into()) })
}

pub async fn run(args: FlowsArgs) -> anyhow::Result<()> {
    let client = MetricsClient::new(&args.url, &args.client)?;
    let step = args.watch.unwrap_or(args.interval);
    let mut before = None;
    let mut taken = Instant::now();
    if step > 0.0 {
        before = Some(scrape(&client, &args.url).await?);
        tokio::time::sleep(Duration::from_secs_f64(step)).await;
    }
    loop {
        let after = scrape(&client, &args.url).await?;
        let elapsed = taken.elapsed().as_secs_f64();
        taken = Instant::now();
        let rows = stats::rows(before.as_ref(), &after, elapsed);
        let text = match args.output {
            Output::Table => render::table(&rows, before.is_some().then_some(elapsed)),
            Output::Json => render::json(&rows, before.is_some().then_some(elapsed))?,
        };
        let mut stdout = std::io::stdout().lock();
        if args.watch.is_some() && args.output == Output::Table && stdout.is_terminal() {
            // Clear the screen and home the cursor, as `watch` does.
            write!(stdout, "\x1b[2J\x1b[H")?;
        }
        writeln!(stdout, "{text}")?;
        stdout.flush()?;
        drop(stdout);
        let Some(every) = args.watch else { return Ok(()) };
        before = Some(after);
        tokio::time::sleep(Duration::from_secs_f64(every)).await;
    }
}

async fn scrape(
    client: &MetricsClient,
    url: &str,
) -> anyhow::Result<std::collections::BTreeMap<stats::FlowKey, stats::FlowCounters>> {
    let text = client.scrape().await.with_context(|| format!("reading {url}"))?;
    let parsed = stats::parse(&text).with_context(|| format!("parsing the metrics of {url}"))?;
    Ok(stats::flows(&parsed))
}
