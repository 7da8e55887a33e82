//! `connscope flows`: a running agent's flows in the terminal, sorted by churn.

#[derive(Debug, clap::Args)]
pub struct FlowsArgs {}

pub async fn run(_args: FlowsArgs) -> anyhow::Result<()> {
    Ok(())
}
