//! `dlq purge` deletes for good, so it asks first: on a terminal the operator types `yes`;
//! anywhere else (scripts, CI, a pipe) `--yes` must be given, and without it nothing is
//! deleted and the command exits 2.

use std::io::{BufRead, IsTerminal, Write};

use crate::commands::UsageError;

/// Whether a person at a terminal can be asked.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// The refusal of a purge that was neither confirmed by `--yes` nor run at a terminal.
pub fn refusal() -> UsageError {
    UsageError(
        "dlq purge deletes dead letters for good: pass --yes to confirm when not at a terminal \
         (nothing was deleted; --dry-run lists what would be)"
            .into(),
    )
}

/// Asks on `out` and reads the answer from `input`: true only for `yes` (or `y`).
pub fn ask(
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    count: usize,
    dlq: &str,
) -> std::io::Result<bool> {
    write!(
        out,
        "Delete {count} dead letter(s) from {dlq} for good? Type yes to continue: "
    )?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "yes" | "y"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_yes_confirms() {
        for (answer, expected) in [("yes\n", true), ("Y\n", true), ("no\n", false), ("", false)] {
            let mut out = Vec::new();
            let got =
                ask(&mut answer.as_bytes(), &mut out, 3, "jobs/$DeadLetterQueue").expect("ask");
            assert_eq!(got, expected, "answer {answer:?}");
            let prompt = String::from_utf8(out).expect("utf-8");
            assert!(prompt.contains("Delete 3 dead letter(s) from jobs/$DeadLetterQueue"));
        }
    }
}
