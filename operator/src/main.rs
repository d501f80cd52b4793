use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    glm_operator::cli::main(glm_operator::cli::Cli::parse()).await
}
