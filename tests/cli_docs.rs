//! The README's "Command line" block and `--help` name the same subcommands and options, so the
//! two cannot drift apart (the manual pages are generated from the same definitions as --help).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");

/// Every `--long-option` in `text`.
fn options(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let rest = &text[i + 2..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        let before = text[..i].chars().last();
        if !name.is_empty() && before.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '-') {
            out.insert(name);
        }
    }
    out.remove("help");
    out.remove("version");
    out
}

fn help(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(o.status.success(), "{args:?} --help");
    String::from_utf8(o.stdout).unwrap()
}

/// The README's command-line block, as subcommand -> the text of its synopsis.
fn readme_synopses() -> BTreeMap<String, String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("## Command line")
        .expect("a Command line section");
    let block = &readme[start..];
    let block = &block[block.find("```").unwrap() + 3..];
    let block = &block[..block.find("```").unwrap()];
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut current = None;
    for line in block.lines() {
        if let Some(rest) = line.strip_prefix("vhost-user-qcow2 ") {
            let sub = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            current = Some(sub.clone());
            out.entry(sub).or_default();
        }
        if let Some(sub) = &current {
            // Only the synopsis: what follows a `#` is a comment.
            let text = line.split('#').next().unwrap_or_default();
            out.get_mut(sub).unwrap().push_str(text);
            out.get_mut(sub).unwrap().push('\n');
        }
    }
    out
}

#[test]
fn readme_and_help_agree() {
    let top = help(&[]);
    let commands: BTreeSet<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "help")
        .collect();
    let readme = readme_synopses();
    let documented: BTreeSet<String> = readme.keys().cloned().collect();
    assert_eq!(commands, documented, "subcommands: --help vs README");
    let mut problems = Vec::new();
    for sub in &commands {
        let h = options(&help(&[sub]));
        let r = options(&readme[sub]);
        for o in h.difference(&r) {
            problems.push(format!("{sub} --{o}: in --help, not in the README"));
        }
        for o in r.difference(&h) {
            problems.push(format!("{sub} --{o}: in the README, not in --help"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
