use super::*;

#[test]
fn smtp_replies_are_classified_in_one_place() {
    let kind = |v: Verdict| match v {
        Verdict::Delivered => "delivered",
        Verdict::Retry { .. } => "retry",
        Verdict::Endpoint { .. } => "endpoint",
        Verdict::Reject { .. } => "reject",
    };
    for (code, reply, expected) in [
        (421, "421 4.3.2 Service shutting down", "retry"),
        (450, "450 4.2.1 Mailbox busy", "retry"),
        (451, "451 Try again later", "retry"),
        (454, "454 4.7.0 Temporary authentication failure", "retry"),
        (
            535,
            "535 5.7.8 Authentication credentials invalid",
            "endpoint",
        ),
        (530, "530 5.7.0 Authentication required", "endpoint"),
        (
            550,
            "550 5.1.1 <sales@contoso.com>: Recipient address rejected",
            "endpoint",
        ),
        (550, "550 No such user", "endpoint"),
        (553, "553 Mailbox name not allowed", "endpoint"),
        (554, "554 5.7.1 Relay access denied", "endpoint"),
        (552, "552 5.3.4 Message size exceeds fixed limit", "reject"),
        (552, "552 Message too big", "reject"),
        (554, "554 Transaction failed", "reject"),
        (550, "550 5.6.0 Lone CR or LF in body", "reject"),
        (502, "502 Command not implemented", "endpoint"),
    ] {
        assert_eq!(kind(classify(code, reply)), expected, "{reply}");
    }
    let Verdict::Endpoint { reason } = classify(550, "550 5.1.1 unknown") else {
        unreachable!()
    };
    assert!(reason.contains("sink.email.to"), "{reason}");
}

#[test]
fn enhanced_status_codes_are_read_after_the_basic_code() {
    assert_eq!(enhanced_status("550 5.1.1 <a@b>: no"), Some((5, 1, 1)));
    assert_eq!(enhanced_status("5.3.4 too big"), Some((5, 3, 4)));
    assert_eq!(enhanced_status("550 No such user"), None);
    assert_eq!(enhanced_status("550 1.2.3.4 blocked"), None);
}

#[test]
fn html_escapes_every_special_character() {
    assert_eq!(
        escape("<b>\"Ana\" & 'Bo'</b>"),
        "&lt;b&gt;&quot;Ana&quot; &amp; &#39;Bo&#39;&lt;/b&gt;"
    );
}

fn entry(id: u64, title: &str) -> Entry {
    Entry {
        link: None,
        id,
        queued_at_ms: 1,
        title: title.into(),
        facts: vec![("Customer".into(), "Ana <script>".into())],
        next_step: "call".into(),
        deadline: "2024-05-03 10:00 UTC".into(),
        footer: "leadsync · ls-1".into(),
    }
}

#[test]
fn a_subject_is_one_line_and_html_holds_no_raw_markup_from_a_lead() {
    let (subject, text, html) = render("[leads] ", &[entry(1, "New trial: Ana\r\nBcc: x@y")]);
    assert_eq!(subject, "[leads] New trial: Ana  Bcc: x@y");
    assert!(text.contains("Customer: Ana <script>"), "{text}");
    assert!(
        html.contains("Ana &lt;script&gt;") && !html.contains("<script>"),
        "{html}"
    );
    let (subject, ..) = render("", &[entry(1, "a"), entry(2, "b")]);
    assert_eq!(subject, "2 marketplace leads to follow up");
}

#[test]
fn a_partial_last_line_left_by_a_crash_is_cut_off_and_later_alerts_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join(DIGEST_FILE);
    let mut queue = Queue {
        path: path.clone(),
        file: None,
        unsynced: vec![],
    };
    queue.append(&entry(1, "one")).unwrap();
    queue.sync().unwrap();
    drop(queue);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(b"{\"id\":2,\"queued_at_ms\"").unwrap();
    drop(file);

    let mut queue = Queue {
        path: path.clone(),
        file: None,
        unsynced: vec![],
    };
    queue.append(&entry(3, "three")).unwrap();
    let titles: Vec<_> = queue.read().unwrap().into_iter().map(|e| e.title).collect();

    assert_eq!(titles, ["one", "three"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
