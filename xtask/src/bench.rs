//! placeholder
pub fn run(_seconds: u32) -> anyhow::Result<()> {
    anyhow::bail!("bench is not implemented yet")
}
