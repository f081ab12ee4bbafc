//! Loading end to end: sources and precedence, databases and IAM rules, users, errors, secrets.

use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use super::*;

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(contents.as_bytes())
        .expect("write temp file");
    file
}

fn path(file: &tempfile::NamedTempFile) -> &str {
    file.path().to_str().expect("utf-8 temp path")
}

fn errors(args: &[&str], env: &[(&str, &str)]) -> Vec<ConfigError> {
    match Config::from_args(args, env) {
        Ok(config) => panic!("expected errors, got {config:?}"),
        Err(errors) => errors.0,
    }
}

fn one_error(args: &[&str], env: &[(&str, &str)]) -> ConfigError {
    let mut all = errors(args, env);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

const RDS_HOST: &str = "mydb.abc123xyz.us-east-1.rds.amazonaws.com";

#[test]
fn sidecar_needs_only_upstream_and_listen() {
    let config = Config::from_args(
        &[
            "--upstream",
            "postgres://app@db.internal/appdb",
            "--listen",
            "127.0.0.1:6432",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(config.listen, vec!["127.0.0.1:6432".parse().unwrap()]);
    let db = config.database("appdb").expect("named after the dbname");
    assert_eq!(db.pool_size, 10);
    assert_eq!(db.pool_mode, PoolMode::Transaction);
    assert_eq!(db.upstream.hosts.len(), 1);
    assert_eq!(db.upstream.hosts[0].port, 5432);
    assert_eq!(db.upstream.sslmode, SslMode::Prefer);
    assert_eq!(db.upstream.auth, UpstreamAuth::Password);
    assert_eq!(db.upstream.max_new_connections_per_second, 50);
    assert_eq!(config.server_lifetime, Duration::from_secs(3600));
    assert_eq!(config.server_lifetime_jitter, Duration::from_secs(360));
    assert_eq!(config.idle_transaction_timeout, None);
    assert_eq!(config.max_message_size, 256 << 20);
    assert_eq!(config.client_tls, ClientTls::Disable);
    assert_eq!(config.auth_type, AuthType::ScramSha256);
    assert!(config.users.is_empty());
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let toml = file("pool_size = 5\nserver_idle_timeout = 100\n[databases.app]\nupstream = \"postgres://app@h/app\"\n");
    let cfg = path(&toml);
    let size = |args: &[&str], env: &[(&str, &str)]| {
        let config = Config::from_args(args, env).unwrap();
        config.databases[0].pool_size
    };
    let env = [("IAMPOOL_CONFIG", cfg), ("IAMPOOL_POOL_SIZE", "7")];
    assert_eq!(size(&["--pool-size", "9"], &env), 9);
    assert_eq!(size(&[], &env), 7);
    assert_eq!(size(&[], &env[..1]), 5);
    assert_eq!(size(&["--upstream", "postgres://x@h/x"], &[]), 10);

    let loaded = Config::load(
        ["iampool", "--config", cfg, "--pool-size", "9"],
        [(
            "IAMPOOL_SERVER_IDLE_TIMEOUT".to_string(),
            "5min".to_string(),
        )],
    )
    .unwrap();
    let config = loaded.config.as_ref().unwrap();
    assert_eq!(config.server_idle_timeout, Duration::from_secs(300));
    assert_eq!(
        loaded.sources["databases.app.pool_size"],
        Origin::Flag("--pool-size".into())
    );
    assert_eq!(
        loaded.sources["server_idle_timeout"],
        Origin::Env("IAMPOOL_SERVER_IDLE_TIMEOUT".into())
    );
    assert_eq!(
        loaded.sources["databases.app.upstream"],
        Origin::File(toml.path().into())
    );
    assert_eq!(loaded.sources["server_lifetime"], Origin::Default);
    assert_eq!(loaded.command, Command::Run);
}

#[test]
fn database_settings_beat_global_ones() {
    let toml = file(
        "pool_mode = \"session\"\n[databases.app]\nupstream = \"postgres://app@h/app?pool_mode=transaction\"\npool_size = 3\n",
    );
    let config = Config::from_args(&["--config", path(&toml), "--pool-size", "9"], &[]).unwrap();
    let db = config.database("app").unwrap();
    assert_eq!((db.pool_size, db.pool_mode), (3, PoolMode::Transaction));
}

#[test]
fn every_url_parameter() {
    let ca = file("not checked here");
    let url = format!(
        "postgres://u@{RDS_HOST}:5433/d?sslmode=verify-ca&sslrootcert={}&hostaddr=10.1.2.3&auth=iam\
         &region=eu-west-1&assume_role_arn=arn:aws:iam::111111111111:role/a,arn:aws:iam::222222222222:role/b\
         &external_id=ext&role_session_name=sess&token_lifetime=600&max_new_connections_per_second=5\
         &reauth_interval=1h&allow_cleartext_password=on&pool_size=4&min_pool_size=1&pool_mode=session&name=front",
        path(&ca)
    );
    let config = Config::from_args(&[], &[("IAMPOOL_UPSTREAM", &url)]).unwrap();
    let db = config.database("front").expect("named by ?name=");
    assert_eq!(
        (db.pool_size, db.min_pool_size, db.pool_mode),
        (4, 1, PoolMode::Session)
    );
    let u = &db.upstream;
    assert_eq!((u.user.as_str(), u.dbname.as_str()), ("u", "d"));
    assert_eq!(
        u.hosts,
        [Host {
            name: RDS_HOST.into(),
            port: 5433,
            addr: Some("10.1.2.3".parse::<IpAddr>().unwrap())
        }]
    );
    assert_eq!(u.sslmode, SslMode::VerifyCa);
    assert_eq!(u.sslrootcert.as_deref(), Some(ca.path()));
    assert_eq!(u.max_new_connections_per_second, 5);
    assert_eq!(u.reauth_interval, Some(Duration::from_secs(3600)));
    assert!(u.allow_cleartext_password);
    let UpstreamAuth::Iam(iam) = &u.auth else {
        panic!("auth=iam")
    };
    assert_eq!(iam.region, "eu-west-1");
    assert!(!iam.region_inferred);
    assert_eq!(iam.assume_role_arns.len(), 2);
    assert_eq!(iam.external_id.as_deref(), Some("ext"));
    assert_eq!(iam.role_session_name, "sess");
    assert_eq!(iam.token_lifetime, Duration::from_secs(600));
}

#[test]
fn url_parameter_mistakes() {
    let e = one_error(&["--upstream", "postgres://u@h/d?sslmdoe=require"], &[]);
    assert_eq!(e.key, "databases.d.sslmdoe");
    assert_eq!(e.source, "the URL in --upstream");
    assert!(
        e.message.contains("unknown URL parameter \"sslmdoe\""),
        "{e}"
    );
    assert_eq!(e.fix, "did you mean sslmode?");

    let e = one_error(
        &["--upstream", "postgres://u@h/d?hostaddr=db.internal"],
        &[],
    );
    assert_eq!(e.key, "databases.d.hostaddr");
    assert!(e.message.contains("is not an IP address"), "{e}");

    let e = one_error(&["--upstream", "postgres://u@h/d?password=hunter2"], &[]);
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn mistakes_are_reported_together_with_key_source_and_fix() {
    let toml = file("max_message_size = \"1TB\"\n");
    let all = errors(
        &[
            "--config",
            path(&toml),
            "--server-lifetime",
            "soon",
            "--upstream",
            "postgres://u@h/d",
        ],
        &[("IAMPOOL_POOL_SIZE", "ten")],
    );
    let lines: Vec<String> = all.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines.contains(
        &"pool_size (from IAMPOOL_POOL_SIZE): \"ten\" is not a number; set a whole number of server connections, e.g. 20".to_string()
    ));
    assert!(lines
        .iter()
        .any(|l| l
            .starts_with("server_lifetime (from --server-lifetime): \"soon\" is not a duration")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with(&format!("max_message_size (from {}): ", path(&toml)))));
}

#[test]
fn unknown_keys_are_rejected_with_suggestions() {
    let toml = file(
        "pool_sise = 3\nauth = \"iam\"\n[databases.app]\nupstream = \"postgres://u@h/d\"\nsslmod = \"require\"\n[users.bob]\npasword = \"x\"\n",
    );
    let env = [("IAMPOOL_POOL_SIZ", "3"), ("IAMPOOL_CONFIG", "ignored")];
    let all = errors(&["--config", path(&toml)], &env);
    let find = |key: &str| {
        all.iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("{key}: {all:#?}"))
    };
    assert_eq!(find("pool_sise").fix, "did you mean pool_size?");
    assert!(find("auth").fix.contains("?auth=iam"), "{all:#?}");
    assert_eq!(find("databases.app.sslmod").fix, "did you mean sslmode?");
    assert_eq!(find("users.bob.pasword").fix, "did you mean password?");
    assert_eq!(find("users.bob.password").message, "is missing");
    assert_eq!(all.len(), 5, "{all:#?}");
    // A variable is a warning, with the same suggestion.
    let loaded = Config::load(
        ["iampool", "--upstream", "postgres://u@h/d"],
        [("IAMPOOL_POOL_SIZ".to_string(), "3".to_string())],
    );
    let warned = &loaded.unwrap().warnings;
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert_eq!(warned[0].fix, "did you mean IAMPOOL_POOL_SIZE?");
    assert_eq!(warned[0].source, "IAMPOOL_POOL_SIZ");
}

/// The warnings of a load that succeeds.
fn warnings(args: &[&str], env: &[(&str, &str)]) -> Vec<ConfigError> {
    let args = std::iter::once("iampool").chain(args.iter().copied());
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    match Config::load(args, env) {
        Ok(loaded) => loaded.warnings,
        Err(errors) => panic!("expected a configuration, got {errors}"),
    }
}

#[test]
fn unknown_variables_warn_while_misplaced_keys_stay_errors() {
    let upstream = ("IAMPOOL_UPSTREAM", "postgres://u@h/d");
    let w = warnings(&[], &[upstream, ("IAMPOOL_BIN", "/usr/local/bin/iampool")]);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!(
        w[0].to_string(),
        "bin (from IAMPOOL_BIN): unknown environment variable, ignored; if it was meant as a setting, iampool --help lists every IAMPOOL_<KEY>"
    );
    let w = warnings(&[], &[upstream, ("IAMPOOL_DEFAULT_POOL_SIZE", "20")]);
    assert_eq!(
        w[0].fix,
        "PgBouncer's default_pool_size is iampool's IAMPOOL_POOL_SIZE"
    );
    // Keys iampool has, in the wrong place or case: the intent is plain, so not ignored.
    let e = one_error(&[], &[upstream, ("IAMPOOL_AUTH", "iam")]);
    assert!(e.fix.contains("?auth=iam"), "{e}");
    let e = one_error(&[], &[upstream, ("IAMPOOL_pool_size", "3")]);
    assert_eq!(e.fix, "write it in upper case: IAMPOOL_POOL_SIZE");
    // Files and flags stay strict.
    let toml = file("upstream = \"postgres://u@h/d\"\nbin = 1\n");
    assert_eq!(one_error(&["--config", path(&toml)], &[]).key, "bin");
    assert_eq!(
        one_error(&["--bin", "1", "--upstream", "postgres://u@h/d"], &[]).key,
        "command line"
    );
}

#[test]
fn pgbouncer_keys_are_answered_with_the_iampool_key() {
    let toml = file(
        "default_pool_size = 20\nlisten_port = 6432\npidfile = \"/run/p.pid\"\nauth_hba_file = \"/etc/hba\"\n\
         [databases.app]\nupstream = \"host=h dbname=app user=u reserve_pool=3\"\nserver_lifetime = 60\ntimezone = \"UTC\"\n\
         [users.bob]\npassword = \"x\"\npool_mode = \"session\"\n",
    );
    let all = errors(&["--config", path(&toml)], &[]);
    let fix = |key: &str| {
        all.iter()
            .find(|e| e.key == key)
            .map(|e| e.fix.clone())
            .unwrap_or_else(|| panic!("{key}: {all:#?}"))
    };
    assert_eq!(
        all.iter().find(|e| e.key == "default_pool_size").unwrap().to_string(),
        format!(
            "default_pool_size (from {}): unknown key; PgBouncer's default_pool_size is iampool's pool_size",
            path(&toml)
        )
    );
    assert!(fix("listen_port").starts_with("PgBouncer's listen_port is iampool's listen: "));
    assert!(fix("pidfile").contains("not needed by iampool"));
    assert!(fix("auth_hba_file").contains("no HBA rules"));
    assert!(fix("databases.app.reserve_pool").contains("PgBouncer's reserve_pool"));
    assert!(fix("databases.app.server_lifetime").contains("set it at the top level"));
    assert!(fix("databases.app.timezone").contains("iampool's options"));
    assert!(fix("users.bob.pool_mode").contains("no per-user settings"));
    assert_eq!(all.len(), 8, "{all:#?}");

    let e = one_error(
        &["--default-pool-size", "5", "--upstream", "postgres://u@h/d"],
        &[],
    );
    assert_eq!(
        e.fix,
        "PgBouncer's default_pool_size is iampool's --pool-size"
    );
    let e = one_error(
        &["--listen-addr=0.0.0.0", "--upstream", "postgres://u@h/d"],
        &[],
    );
    assert!(
        e.fix
            .starts_with("PgBouncer's listen_addr is iampool's --listen: "),
        "{e}"
    );
}

#[test]
fn a_pgbouncer_ini_given_as_the_file_points_to_the_import() {
    let ini = file("[databases]\napp = host=db dbname=app\n[pgbouncer]\nlisten_port = 6432\n");
    let all = errors(&["--config", path(&ini)], &[]);
    let e = all
        .iter()
        .find(|e| e.key == "config")
        .expect("a TOML error");
    assert!(e.fix.contains("iampool import-pgbouncer"), "{e}");
    let quoted = file("[databases]\napp = \"host=db dbname=app user=u\"\n");
    let all = errors(&["--config", path(&quoted)], &[]);
    let e = all
        .iter()
        .find(|e| e.key == "databases.app")
        .expect("an error on it");
    assert!(e.fix.contains("[databases.app] with upstream = "), "{e}");
}

#[test]
fn iam_rules() {
    let config = Config::from_args(
        &[
            "--upstream",
            &format!("postgres://app@{RDS_HOST}/appdb?auth=iam"),
        ],
        &[],
    )
    .unwrap();
    let u = &config.databases[0].upstream;
    assert_eq!(u.sslmode, SslMode::VerifyFull);
    let UpstreamAuth::Iam(iam) = &u.auth else {
        panic!("iam")
    };
    assert_eq!(
        (iam.region.as_str(), iam.region_inferred),
        ("us-east-1", true)
    );
    assert_eq!(iam.token_lifetime, Duration::from_secs(900));
    assert_eq!(iam.role_session_name, "iampool");

    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode=prefer"),
        ],
        &[],
    );
    assert_eq!(e.key, "databases.d.sslmode");
    assert!(
        e.message
            .contains("the IAM token is sent as a cleartext password"),
        "{e}"
    );
    assert!(e.fix.starts_with("use sslmode=verify-full"), "{e}");

    // TLS that does not verify the server is refused too: the token would go to whoever
    // answers. Only the loudly named opt-out lets a test setup use it.
    for mode in ["require", "prefer", "allow"] {
        let url = format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode={mode}");
        let e = one_error(&["--upstream", &url], &[]);
        assert_eq!(e.key, "databases.d.sslmode", "{mode}");
        assert!(e.fix.contains("insecure_unverified_tls"), "{e}");
    }
    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode=require"),
        ],
        &[],
    );
    assert!(e.message.contains("does not verify the server"), "{e}");
    let config = Config::from_args(
        &[
            "--upstream",
            &format!(
                "postgres://app@{RDS_HOST}/d?auth=iam&sslmode=require&insecure_unverified_tls=true"
            ),
        ],
        &[],
    )
    .unwrap();
    let u = &config.databases[0].upstream;
    assert_eq!(
        (u.sslmode, u.insecure_unverified_tls),
        (SslMode::Require, true)
    );
    let e = one_error(
        &[
            "--upstream",
            &format!(
                "postgres://app@{RDS_HOST}/d?auth=iam&sslmode=prefer&insecure_unverified_tls=true"
            ),
        ],
        &[],
    );
    assert!(e.message.contains("too weak"), "{e}");
    for mode in ["verify-ca", "verify-full"] {
        let url = format!("postgres://app@{RDS_HOST}/d?auth=iam&sslmode={mode}");
        assert!(
            Config::from_args(&["--upstream", &url], &[]).is_ok(),
            "{mode}"
        );
    }

    let e = one_error(
        &["--upstream", "postgres://app@db.internal/d?auth=iam"],
        &[],
    );
    assert_eq!(e.key, "databases.d.region");
    assert!(e.fix.contains("region=us-east-1"), "{e}");
    let config = Config::from_args(
        &[
            "--upstream",
            "postgres://app@db.internal/d?auth=iam",
            "--region",
            "eu-west-1",
        ],
        &[],
    )
    .unwrap();
    assert!(
        matches!(&config.databases[0].upstream.auth, UpstreamAuth::Iam(iam) if iam.region == "eu-west-1")
    );

    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://app:hunter2@{RDS_HOST}/d?auth=iam"),
        ],
        &[],
    );
    assert_eq!(e.key, "databases.d.password");
    assert!(
        e.message.contains("auth=iam") && !e.to_string().contains("hunter2"),
        "{e}"
    );
}

#[test]
fn range_and_cross_checks() {
    let up = "postgres://u@h/d";
    let e = one_error(
        &["--upstream", up, "--max-new-connections-per-second", "0"],
        &[],
    );
    assert_eq!(e.key, "max_new_connections_per_second");
    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://u@{RDS_HOST}/d?auth=iam&token_lifetime=20min"),
        ],
        &[],
    );
    assert_eq!(e.key, "databases.d.token_lifetime");
    let e = one_error(&["--upstream", up, "--max-message-size", "4kB"], &[]);
    assert_eq!(e.key, "max_message_size");
    let e = one_error(&["--upstream", up, "--min-pool-size", "20"], &[]);
    assert_eq!(
        (e.key.as_str(), e.source.as_str()),
        ("min_pool_size", "--min-pool-size")
    );
    assert!(e.message.contains("more than pool_size 10"), "{e}");
    let e = one_error(
        &[
            "--upstream",
            up,
            "--server-lifetime",
            "1min",
            "--server-lifetime-jitter",
            "2min",
        ],
        &[],
    );
    assert_eq!(e.key, "server_lifetime_jitter");
    let e = one_error(&["--upstream", up, "--log-level", "info,[[["], &[]);
    assert_eq!(e.key, "log_level");
    let e = one_error(&["--upstream", up, "--listen", "localhost:6432"], &[]);
    assert_eq!(e.key, "listen");
    let config = Config::from_args(
        &[
            "--upstream",
            up,
            "--listen",
            "127.0.0.1:1, [::1]:2",
            "--idle-transaction-timeout",
            "30s",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(config.listen.len(), 2);
    assert_eq!(
        config.idle_transaction_timeout,
        Some(Duration::from_secs(30))
    );
}

#[test]
fn client_knobs_parse_and_bad_values_name_the_key() {
    let up = "postgres://u@h/d";
    let config = Config::from_args(
        &[
            "--upstream",
            up,
            "--query-timeout",
            "90s",
            "--client-idle-timeout",
            "0",
            "--application-name-add-host",
            "on",
        ],
        &[(
            "IAMPOOL_IGNORE_STARTUP_PARAMETERS",
            "Extra_Float_Digits, options",
        )],
    )
    .unwrap();
    assert_eq!(config.query_timeout, Some(Duration::from_secs(90)));
    assert_eq!(config.client_idle_timeout, None);
    assert!(config.application_name_add_host);
    assert_eq!(
        config.ignore_startup_parameters,
        ["extra_float_digits", "options"]
    );
    let e = one_error(&["--upstream", up, "--query-timeout", "soon"], &[]);
    assert_eq!(e.key, "query_timeout");
    let e = one_error(
        &[
            "--upstream",
            up,
            "--ignore-startup-parameters",
            "extra_float_digits,user",
        ],
        &[],
    );
    assert_eq!(e.key, "ignore_startup_parameters");
    assert!(e.fix.contains("remove user"), "{e}");
}

#[test]
fn no_database_is_an_error_naming_upstream() {
    let e = one_error(&[], &[]);
    assert_eq!(e.key, "upstream");
    assert!(e.fix.contains("--upstream postgres://"), "{e}");
    // Bad global defaults are still reported alongside.
    assert_eq!(errors(&[], &[("IAMPOOL_SSLMODE", "strict")]).len(), 2);
}

#[test]
fn several_upstream_urls_and_duplicate_names() {
    let env = [(
        "IAMPOOL_UPSTREAM",
        "postgres://a@h/one\n  postgres://b@h/two?name=second",
    )];
    let config = Config::from_args(&[], &env).unwrap();
    let names: Vec<&str> = config.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["one", "second"]);

    let toml = file("[databases.one]\nupstream = \"postgres://x@h/x\"\n");
    let e = one_error(
        &["--config", path(&toml), "--upstream", "postgres://a@h/one"],
        &[],
    );
    assert_eq!(e.key, "databases.one");
    assert!(e.message.contains("defined twice"), "{e}");
}

#[test]
fn client_tls_rules() {
    let (cert, key) = (file("cert"), file("key"));
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [&["--upstream", "postgres://u@h/d"][..], extra].concat()
    }
    let config = Config::from_args(
        &with(&[
            "--client-tls-cert-file",
            path(&cert),
            "--client-tls-key-file",
            path(&key),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(config.client_tls, ClientTls::Allow);
    let e = one_error(&with(&["--client-tls", "require"]), &[]);
    assert_eq!(e.key, "client_tls");
    let e = one_error(&with(&["--client-tls-cert-file", path(&cert)]), &[]);
    assert_eq!(e.key, "client_tls_cert_file");
    let e = one_error(&with(&["--client-tls-key-file", "/no/such/file"]), &[]);
    assert!(e.message.contains("not an existing file"), "{e}");
}

#[test]
fn users_from_table_auth_file_and_urls() {
    let scram = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";
    let auth = file(&format!(
        "; users\n\"alice\" \"from-file\"\n\"carol\" \"{scram}\"\n\"app\" \"file-app\"\n"
    ));
    let toml = file(&format!(
        "auth_file = {:?}\n[users.alice]\npassword = \"from-table\"\n[databases.app]\nupstream = \"postgres://app:url-app@h/app\"\n[databases.rep]\nupstream = \"postgres://rep@h/rep\"\npassword = \"rep-pw\"\n",
        path(&auth)
    ));
    let loaded = Config::load(["iampool", "--config", path(&toml)], Vec::new()).unwrap();
    let users = &loaded.config.as_ref().unwrap().users;
    let plain = |name: &str| match &users[name] {
        UserSecret::Plain(secret) => secret.expose().to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(plain("alice"), "from-table");
    assert_eq!(plain("app"), "file-app");
    assert_eq!(plain("rep"), "rep-pw");
    assert!(matches!(&users["carol"], UserSecret::Scram(_)));
    assert_eq!(
        loaded.sources["users.carol"],
        Origin::AuthFile(auth.path().into())
    );
}

#[test]
fn auth_file_mistakes_name_the_line() {
    let auth = file("\"ok\" \"fine\"\nalice hunter2\n");
    let e = one_error(
        &["--upstream", "postgres://u@h/d", "--auth-file", path(&auth)],
        &[],
    );
    assert_eq!(e.key, "auth_file");
    assert_eq!(e.source, format!("{} line 2", path(&auth)));
    assert!(!e.to_string().contains("hunter2"));

    let md5 = file(&format!("\"bob\" \"md5{}\"\n", "0".repeat(32)));
    let e = one_error(
        &["--upstream", "postgres://u@h/d", "--auth-file", path(&md5)],
        &[],
    );
    assert_eq!(e.key, "auth_type");
    assert!(Config::from_args(
        &[
            "--upstream",
            "postgres://u@h/d",
            "--auth-file",
            path(&md5),
            "--auth-type",
            "md5"
        ],
        &[]
    )
    .is_ok());
}

#[test]
fn secrets_never_show() {
    let auth = file("\"fileuser\" \"s3cret-file\"\n");
    let toml = file(&format!(
        "auth_file = {:?}\n[users.alice]\npassword = \"s3cret-table\"\n[databases.rep]\nupstream = \"postgres://rep@h/rep\"\npassword = \"s3cret-db\"\n",
        path(&auth)
    ));
    let args = [
        "iampool",
        "--config",
        path(&toml),
        "--upstream",
        "postgres://app:s3cret-url@h/app",
    ];
    let loaded = Config::load(args, Vec::new()).unwrap();
    let config = loaded.config.clone().unwrap();
    for shown in [
        format!("{config:?}"),
        format!("{loaded:?}"),
        config.render_redacted(),
        loaded.render_redacted(),
    ] {
        assert!(!shown.contains("s3cret"), "{shown}");
    }
    assert!(loaded.render_redacted().contains("<redacted>"));

    // Errors elsewhere in the same configuration: still nothing secret.
    let mut bad: Vec<&str> = args[1..].to_vec();
    bad.extend([
        "--pool-size",
        "x",
        "--upstream",
        "postgres://app:s3cret-url@h/app?auth=iam&sslmdoe=1",
    ]);
    let all =
        Config::from_args(&bad, &[("IAMPOOL_UPSTREAM", "postgres://u:s3cret-env@")]).unwrap_err();
    assert!(all.0.len() >= 3, "{all}");
    assert!(
        !all.to_string().contains("s3cret") && !format!("{all:?}").contains("s3cret"),
        "{all}"
    );
    let toml = file("[users.x]\npassword = \"s3cret\" oops\n");
    let all = Config::from_args(&["--config", path(&toml)], &[]).unwrap_err();
    assert!(all.to_string().contains("line 2"), "{all}");
    assert!(!all.to_string().contains("s3cret"), "{all}");
}

#[test]
fn rendered_config_loads_back_to_the_same_config() {
    let toml = file(
        "listen = \"127.0.0.1:7000,[::1]:7001\"\nserver_lifetime = \"90min\"\nadmin_users = [\"admin\", \"ops\"]\nmax_message_size = 1048576\n\
         [databases.\"odd name\"]\nupstream = \"postgres://a%20b@[::1]:6000/x?hostaddr=::1\"\npool_size = 2\n\
         [databases.iam]\nupstream = \"postgres://app@db.internal/appdb?auth=iam&region=us-west-2\"\nassume_role_arn = \"arn:aws:iam::123456789012:role/x\"\nreauth_interval = \"12h\"\n",
    );
    let loaded = Config::load(
        ["iampool", "--config", path(&toml), "--log-level", "debug"],
        Vec::new(),
    )
    .unwrap();
    let rendered = loaded.render_redacted();
    assert!(
        rendered.contains(&format!("# {}", path(&toml))),
        "{rendered}"
    );
    assert!(rendered.contains("# --log-level"), "{rendered}");
    let again = file(&rendered);
    let mut reloaded = Config::from_args(&["--config", path(&again)], &[]).unwrap();
    // Everything but where it was read from.
    assert_eq!(reloaded.watched_files, [again.path()]);
    reloaded.watched_files = vec![toml.path().to_path_buf()];
    assert_eq!(Some(&reloaded), loaded.config.as_ref(), "{rendered}");
}

#[test]
fn changed_keys_for_reload() {
    let old = Config::from_args(&["--upstream", "postgres://u@h/d"], &[]).unwrap();
    let new = Config::from_args(
        &[
            "--upstream",
            "postgres://u@h/e",
            "--pool-size",
            "3",
            "--listen",
            "0.0.0.0:1",
        ],
        &[],
    )
    .unwrap();
    let changed = old.changed_keys(&new);
    assert_eq!(changed, ["listen", "databases"]);
    let needs_restart: Vec<_> = changed
        .into_iter()
        .filter(|key| !is_reloadable(key))
        .collect();
    assert_eq!(needs_restart, ["listen"]);
}

#[test]
fn commands() {
    let loaded = Config::load(
        ["iampool", "check-config", "--upstream", "postgres://u@h/d"],
        Vec::new(),
    )
    .unwrap();
    assert_eq!(loaded.command, Command::CheckConfig);
    assert!(loaded.render_redacted().contains("[databases.d]"));

    let token = [
        "iampool",
        "token",
        "--host",
        RDS_HOST,
        "--port",
        "5433",
        "--user",
        "u",
        "--signing-time",
        "2024-01-02T03:04:05Z",
    ];
    let loaded = Config::load(token, Vec::new()).unwrap();
    assert!(loaded.config.is_none());
    let Command::Token(args) = loaded.command else {
        panic!("token")
    };
    assert_eq!(
        (args.port, args.signing_time.as_deref()),
        (5433, Some("2024-01-02T03:04:05Z"))
    );
    let bad = Config::load(
        [
            "iampool",
            "token",
            "--host",
            "h",
            "--user",
            "u",
            "--signing-time",
            "yesterday",
        ],
        Vec::new(),
    );
    assert_eq!(bad.unwrap_err().0[0].key, "signing_time");

    let e = Config::from_args(&["--pool-sise", "3"], &[]).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(e.0[0].fix.contains("--pool-size"), "{e}");
}

#[test]
fn import_pgbouncer_command_loads_no_configuration() {
    let loaded = Config::load(
        [
            "iampool",
            "import-pgbouncer",
            "pgbouncer.ini",
            "users.txt",
            "-o",
            "out.toml",
        ],
        [("IAMPOOL_POOL_SIZE".to_string(), "not a number".to_string())],
    )
    .unwrap();
    assert_eq!(
        loaded.command,
        Command::ImportPgbouncer(ImportArgs {
            ini: "pgbouncer.ini".into(),
            userlist: Some("users.txt".into()),
            output: Some("out.toml".into()),
        })
    );
    assert!(loaded.config.is_none());
    assert!(Config::load(["iampool", "import-pgbouncer"], Vec::new()).is_err());
}

#[test]
fn example_file_is_a_working_configuration() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/iampool.example.toml");
    let config = Config::from_args(&["--config", example], &[]).unwrap();
    let db = config.database("app").unwrap();
    assert!(matches!(&db.upstream.auth, UpstreamAuth::Iam(iam) if iam.region_inferred));
}

#[test]
fn file_lists_are_arrays_or_strings() {
    let toml = file(
        "admin_users = [\"a\", \"b\"]\nstats_users = \"c, d\"\nupstream = [\"postgres://x@h/x\", \"postgres://y@h/y\"]\nlisten = [\"127.0.0.1:1\"]\n",
    );
    let config = Config::from_args(
        &["--config", path(&toml)],
        &[("IAMPOOL_ASSUME_ROLE_ARN", "")],
    )
    .unwrap();
    assert_eq!(config.admin_users, ["a", "b"]);
    assert_eq!(config.stats_users, ["c", "d"]);
    assert_eq!(config.databases.len(), 2);
    let e = one_error(
        &[
            "--config",
            path(&file(
                "admin_users = [1]\nupstream = \"postgres://x@h/x\"\n",
            )),
        ],
        &[],
    );
    assert_eq!(e.key, "admin_users");
}

#[test]
fn kubernetes_service_links_are_not_unknown_keys() {
    let env = [
        ("IAMPOOL_SERVICE_HOST", "10.0.0.1"),
        ("IAMPOOL_SERVICE_PORT", "6432"),
        ("IAMPOOL_SERVICE_PORT_PG", "6432"),
        ("IAMPOOL_PORT", "tcp://10.0.0.1:6432"),
        ("IAMPOOL_PORT_6432_TCP", "tcp://10.0.0.1:6432"),
        ("IAMPOOL_PORT_6432_TCP_PROTO", "tcp"),
        ("IAMPOOL_PORT_6432_TCP_PORT", "6432"),
        ("IAMPOOL_PORT_6432_TCP_ADDR", "10.0.0.1"),
        ("IAMPOOL_UPSTREAM", "postgres://u@h/d"),
    ];
    assert!(warnings(&[], &env).is_empty());
    let w = warnings(
        &[],
        &[
            ("IAMPOOL_PORT", "6432"),
            ("IAMPOOL_UPSTREAM", "postgres://u@h/d"),
        ],
    );
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!(w[0].source, "IAMPOOL_PORT");
}

#[test]
fn key_file_variables_read_the_value_from_a_file() {
    let url = file("postgres://app:s3cret@db.internal/app?sslmode=disable\n");
    let config = Config::from_args(&[], &[("IAMPOOL_UPSTREAM_FILE", path(&url))]).expect("loads");
    let upstream = &config.databases[0].upstream;
    assert_eq!(
        upstream.password.as_ref().map(Secret::expose),
        Some("s3cret"),
        "the line end is not part of the value"
    );
    assert_eq!(config.watched_files, [url.path()]);

    // IAMPOOL_AUTH_FILE is a key of its own (a path), not AUTH with _FILE.
    let users = file("\"bob\" \"pw\"\n");
    let config = Config::from_args(
        &["--upstream", "postgres://u@h/d"],
        &[("IAMPOOL_AUTH_FILE", path(&users))],
    )
    .expect("loads");
    assert!(config.users.contains_key("bob"));
    assert_eq!(config.watched_files, [users.path()]);
}

#[test]
fn key_file_variables_name_the_problem() {
    let url = file("postgres://app@db.internal/app");
    let both = errors(
        &[],
        &[
            ("IAMPOOL_UPSTREAM", "postgres://u@h/d"),
            ("IAMPOOL_UPSTREAM_FILE", path(&url)),
        ],
    );
    assert_eq!(both.len(), 1, "{both:#?}");
    assert_eq!(both[0].source, "IAMPOOL_UPSTREAM_FILE");
    assert_eq!(
        both[0].message,
        "both IAMPOOL_UPSTREAM_FILE and IAMPOOL_UPSTREAM are set"
    );

    let missing = errors(
        &[],
        &[("IAMPOOL_UPSTREAM_FILE", "/nonexistent/iampool/upstream")],
    );
    let e = missing
        .iter()
        .find(|e| e.source == "IAMPOOL_UPSTREAM_FILE")
        .unwrap_or_else(|| panic!("{missing:#?}"));
    assert!(
        e.message
            .starts_with("cannot read /nonexistent/iampool/upstream"),
        "{e}"
    );
    assert!(e.fix.contains("or set IAMPOOL_UPSTREAM instead"), "{e}");

    // A typo in front of _FILE is still an unknown variable, with a suggestion.
    let typo = warnings(
        &["--upstream", "postgres://u@h/d"],
        &[("IAMPOOL_UPSTRAEM_FILE", "x")],
    );
    assert_eq!(typo.len(), 1, "{typo:#?}");
    assert_eq!(typo[0].message, "unknown environment variable, ignored");
    assert_eq!(typo[0].fix, "did you mean IAMPOOL_UPSTREAM_FILE?");
}

#[test]
fn read_only_database_names_another_transaction_mode_database() {
    let ok = file(
        "[databases.app]\nupstream = \"postgres://app@writer/app\"\nread_only_database = \"app_ro\"\n\
         [databases.app_ro]\nupstream = \"postgres://app@reader/app?target_session_attrs=read-only\"\n",
    );
    let config = Config::from_args(&["--config", path(&ok)], &[]).unwrap();
    let app = config.databases.iter().find(|d| d.name == "app").unwrap();
    assert_eq!(app.read_only_database.as_deref(), Some("app_ro"));

    for (toml, message, fix) in [
        (
            "[databases.app]\nupstream = \"postgres://app@h/app?read_only_database=nope\"\n",
            "names \"nope\", which is not a configured database",
            "add [databases.nope]",
        ),
        (
            "[databases.app]\nupstream = \"postgres://app@h/app\"\nread_only_database = \"app\"\n",
            "names this database itself",
            "reader endpoint",
        ),
        (
            "[databases.app]\nupstream = \"postgres://app@h/app\"\nread_only_database = \"ro\"\n\
             [databases.ro]\nupstream = \"postgres://app@r/app\"\npool_mode = \"session\"\n",
            "whose pool_mode is session",
            "[databases.ro]",
        ),
    ] {
        let toml = file(toml);
        let all = errors(&["--config", path(&toml)], &[]);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(all[0].key, "databases.app.read_only_database");
        assert!(all[0].message.contains(message), "{all:#?}");
        assert!(all[0].fix.contains(fix), "{all:#?}");
    }
}

fn host(name: &str, port: u16, addr: Option<&str>) -> Host {
    Host {
        name: name.into(),
        port,
        addr: addr.map(|a| a.parse().unwrap()),
    }
}

fn upstream(args: &[&str], env: &[(&str, &str)]) -> Upstream {
    let config = Config::from_args(args, env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.databases.len(), 1);
    config.databases[0].upstream.clone()
}

#[test]
fn several_hosts_in_a_url() {
    let u = upstream(
        &[
            "--upstream",
            "postgres://u@h1:5432,h2:5433,[::1]:5434,h4/db",
        ],
        &[],
    );
    assert_eq!(
        u.hosts,
        [
            host("h1", 5432, None),
            host("h2", 5433, None),
            host("::1", 5434, None),
            host("h4", 5432, None)
        ]
    );
    let u = upstream(
        &[
            "--upstream",
            "postgres://u@h1,h2/db?port=6000&hostaddr=10.0.0.1,",
        ],
        &[],
    );
    assert_eq!(
        u.hosts,
        [host("h1", 6000, Some("10.0.0.1")), host("h2", 6000, None)]
    );
    // The hostaddr key takes a list too, one entry per host.
    let toml =
        file("[databases.app]\nupstream = \"postgres://u@h1,h2/db\"\nhostaddr = \",10.0.0.2\"\n");
    let u = upstream(&["--config", path(&toml)], &[]);
    assert_eq!(
        u.hosts,
        [host("h1", 5432, None), host("h2", 5432, Some("10.0.0.2"))]
    );
}

#[test]
fn keyword_value_strings() {
    let u = upstream(
        &[
            "--upstream",
            "host=db.example.com port=5433 dbname=app user=iam_user sslmode=verify-full",
        ],
        &[],
    );
    assert_eq!(u.hosts, [host("db.example.com", 5433, None)]);
    assert_eq!((u.user.as_str(), u.dbname.as_str()), ("iam_user", "app"));
    assert_eq!(u.sslmode, SslMode::VerifyFull);

    let config = Config::from_args(
        &[
            "--upstream",
            " host = 'h1,h2' port=5432,5433 hostaddr=',10.0.0.2' user='a b' password='p\\'w' dbname=x\\ y name=front pool_size=3 target_session_attrs=read-write application_name='my app' options='-c search_path=app'",
        ],
        &[],
    )
    .unwrap();
    let db = config.database("front").expect("named by name=");
    assert_eq!(db.pool_size, 3);
    let u = &db.upstream;
    assert_eq!(
        u.hosts,
        [host("h1", 5432, None), host("h2", 5433, Some("10.0.0.2"))]
    );
    assert_eq!((u.user.as_str(), u.dbname.as_str()), ("a b", "x y"));
    assert_eq!(u.password.as_ref().map(Secret::expose), Some("p'w"));
    assert_eq!(u.target_session_attrs, TargetSessionAttrs::ReadWrite);
    assert_eq!(u.application_name.as_deref(), Some("my app"));
    assert_eq!(u.options.as_deref(), Some("-c search_path=app"));
    // A password in the string makes its user a client user, as for a URL.
    assert!(config.users.contains_key("a b"));

    // In the file: [databases.NAME] upstream, and a top-level array may list several.
    let toml = file(
        "upstream = [\"host=h dbname=one user=u\", \"postgres://u@h/two\"]\n[databases.three]\nupstream = \"host=h user=u\"\n",
    );
    let config = Config::from_args(&["--config", path(&toml)], &[]).unwrap();
    let mut names: Vec<&str> = config.databases.iter().map(|d| d.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["one", "three", "two"]);
    assert_eq!(config.database("three").unwrap().upstream.dbname, "u");
}

#[test]
fn keyword_value_mistakes() {
    for (text, key, expect) in [
        ("host=h port", "upstream", "missing \"=\" after \"port\""),
        ("host='h user=u", "upstream", "never closed"),
        (
            "host=h user=u port=1,2",
            "databases.u.port",
            "could not match 2 port numbers to 1 hosts",
        ),
        (
            "host=h1,h2 user=u port=1,2,3",
            "databases.u.port",
            "could not match 3 port numbers to 2 hosts",
        ),
        (
            "host=h user=u port=0",
            "databases.u.port",
            "invalid port number \"0\"",
        ),
        (
            "host=h1,h2 hostaddr=10.0.0.1 user=u",
            "databases.u.hostaddr",
            "could not match 2 host names to 1 hostaddr",
        ),
        (
            "host=h hostaddr=h user=u",
            "databases.u.hostaddr",
            "is not an IP address",
        ),
        (
            "host=h user=u target_session_attrs=writer",
            "databases.u.target_session_attrs",
            "is not one of",
        ),
        (
            "host=h user=u load_balance_hosts=yes",
            "databases.u.load_balance_hosts",
            "is not one of",
        ),
        (
            "host=h user=u connect_timeout=soon",
            "databases.u.connect_timeout",
            "is not a number",
        ),
        ("host=/tmp user=u", "databases.u.host", "unix-domain socket"),
        ("user=u", "databases.u.host", "names no host"),
        ("host=h", "upstream", "names no user"),
        ("host=h user=u user=v", "upstream", "given twice"),
        ("host=h user=u postgres://u@h/db", "upstream", "mixes"),
    ] {
        let all = errors(&["--upstream", text], &[]);
        assert!(
            all.iter()
                .any(|e| e.key == key && e.message.contains(expect)),
            "{text}: {all:#?}"
        );
    }
    let e = one_error(&["--upstream", "host=h user=u sslmdoe=require"], &[]);
    assert_eq!(e.key, "databases.u.sslmdoe");
    assert_eq!(e.source, "the connection string in --upstream");
    assert_eq!(e.message, "unknown connection keyword \"sslmdoe\"");
    assert_eq!(e.fix, "did you mean sslmode?");
    let e = one_error(&["--upstream", "host=h user=u password=s3cret oops"], &[]);
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

#[test]
fn unsupported_libpq_keywords_say_so() {
    for (param, fix) in [
        ("sslcert=/c.pem", "client certificate"),
        ("gssencmode=prefer", "GSSAPI"),
        ("requiressl=1", "sslmode=require"),
        ("service=prod", "pg_service.conf"),
        ("keepalives=1", "TCP"),
    ] {
        let name = param.split('=').next().unwrap();
        for text in [
            format!("host=h user=u {param}"),
            format!("postgres://u@h/u?{param}"),
        ] {
            let e = one_error(&["--upstream", &text], &[]);
            assert_eq!(e.key, format!("databases.u.{name}"), "{text}");
            assert_eq!(
                e.message,
                format!("libpq's {name} is not supported by iampool"),
                "{text}"
            );
            assert!(e.fix.contains(fix), "{text}: {e}");
        }
    }
}

#[test]
fn new_upstream_keys() {
    let u = upstream(&["--upstream", "postgres://u@h/d"], &[]);
    assert_eq!(u.load_balance_hosts, LoadBalanceHosts::Disable);
    assert_eq!(
        (u.connect_timeout, u.application_name, u.options),
        (None, None, None)
    );
    let u = upstream(
        &[
            "--upstream",
            "postgres://u@h/d?load_balance_hosts=random&connect_timeout=1&application_name=web&options=-c%20search_path%3Dapp",
        ],
        &[],
    );
    assert_eq!(u.load_balance_hosts, LoadBalanceHosts::Random);
    assert_eq!(
        u.connect_timeout,
        Some(Duration::from_secs(2)),
        "1 is raised to 2"
    );
    assert_eq!(u.application_name.as_deref(), Some("web"));
    assert_eq!(u.options.as_deref(), Some("-c search_path=app"));
    let u = upstream(
        &["--upstream", "postgres://u@h/d", "--connect-timeout", "10"],
        &[],
    );
    assert_eq!(u.connect_timeout, Some(Duration::from_secs(10)));
    let u = upstream(
        &["--upstream", "postgres://u@h/d?connect_timeout=0"],
        &[("IAMPOOL_CONNECT_TIMEOUT", "5")],
    );
    assert_eq!(u.connect_timeout, None, "0 uses server_connect_timeout");
    for key in [
        "load_balance_hosts",
        "connect_timeout",
        "application_name",
        "options",
    ] {
        assert!(!is_reloadable(key), "{key}");
        assert!(!is_reloadable(&format!("databases.app.{key}")), "{key}");
    }
}

#[test]
fn libpq_environment_fills_in_what_the_string_leaves_out() {
    let pg = [
        ("PGHOST", "h1,h2"),
        ("PGPORT", "5433,5434"),
        ("PGUSER", "envuser"),
        ("PGDATABASE", "envdb"),
        ("PGSSLMODE", "require"),
        ("PGCONNECT_TIMEOUT", "7"),
        ("PGAPPNAME", "envapp"),
        ("PGOPTIONS", "-c work_mem=64MB"),
        ("PGTARGETSESSIONATTRS", "read-only"),
        ("PGLOADBALANCEHOSTS", "random"),
        ("PGHOSTADDR", "10.0.0.1,10.0.0.2"),
    ];
    let loaded = Config::load(
        ["iampool", "--upstream", "sslmode=disable"],
        pg.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    let db = &loaded.config.as_ref().unwrap().databases[0];
    assert_eq!(db.name, "envdb");
    let u = &db.upstream;
    assert_eq!(
        u.hosts,
        [
            host("h1", 5433, Some("10.0.0.1")),
            host("h2", 5434, Some("10.0.0.2"))
        ]
    );
    assert_eq!((u.user.as_str(), u.dbname.as_str()), ("envuser", "envdb"));
    assert_eq!(u.sslmode, SslMode::Disable, "the string's own value wins");
    assert_eq!(u.connect_timeout, Some(Duration::from_secs(7)));
    assert_eq!(u.application_name.as_deref(), Some("envapp"));
    assert_eq!(u.options.as_deref(), Some("-c work_mem=64MB"));
    assert_eq!(u.target_session_attrs, TargetSessionAttrs::ReadOnly);
    assert_eq!(u.load_balance_hosts, LoadBalanceHosts::Random);
    let env = |var: &str| Origin::Env(var.into());
    let s = &loaded.sources;
    assert_eq!(s["databases.envdb.host"], env("PGHOST"));
    assert_eq!(s["databases.envdb.port"], env("PGPORT"));
    assert_eq!(s["databases.envdb.user"], env("PGUSER"));
    assert_eq!(s["databases.envdb.dbname"], env("PGDATABASE"));
    assert_eq!(s["databases.envdb.hostaddr"], env("PGHOSTADDR"));
    assert_eq!(s["databases.envdb.application_name"], env("PGAPPNAME"));
    assert_eq!(
        s["databases.envdb.sslmode"],
        Origin::Keywords(Box::new(Origin::Flag("--upstream".into())))
    );

    // The string > iampool's own key > PG* > default.
    let sslmode = |args: &[&str], env: &[(&str, &str)]| upstream(args, env).sslmode;
    let url = "postgres://u@h/d";
    assert_eq!(
        sslmode(&["--upstream", url], &[("PGSSLMODE", "require")]),
        SslMode::Require
    );
    assert_eq!(
        sslmode(
            &["--upstream", url],
            &[("PGSSLMODE", "require"), ("IAMPOOL_SSLMODE", "disable")]
        ),
        SslMode::Disable
    );
    assert_eq!(
        sslmode(
            &[
                "--upstream",
                &format!("{url}?sslmode=allow"),
                "--sslmode",
                "disable"
            ],
            &[("PGSSLMODE", "require")]
        ),
        SslMode::Allow
    );
    // The string's own host and port win over PGHOST and PGPORT; an empty variable is unset.
    let u = upstream(
        &["--upstream", "postgres://u@own:6000/d"],
        &[("PGHOST", "env"), ("PGPORT", "7000"), ("PGUSER", "")],
    );
    assert_eq!((u.hosts[0].name.as_str(), u.hosts[0].port), ("own", 6000));
    // As in libpq: a URL with one host and no port takes PGPORT.
    let u = upstream(&["--upstream", url], &[("PGPORT", "7000")]);
    assert_eq!(u.hosts[0].port, 7000);

    // A bad PG* value is reported as coming from that variable.
    let e = one_error(&["--upstream", url], &[("PGTARGETSESSIONATTRS", "writer")]);
    assert_eq!(
        (e.key.as_str(), e.source.as_str()),
        ("databases.d.target_session_attrs", "PGTARGETSESSIONATTRS")
    );
    let e = one_error(&["--upstream", "host=h user=u"], &[("PGPORT", "1,2")]);
    assert_eq!(
        (e.key.as_str(), e.source.as_str()),
        ("databases.u.port", "PGPORT")
    );
}

#[test]
fn pgpassword_is_the_password_of_password_upstreams_only() {
    let loaded = Config::load(
        ["iampool", "--upstream", "postgres://app@h/app"],
        [("PGPASSWORD".to_string(), "s3cret-env".to_string())],
    )
    .unwrap();
    let config = loaded.config.as_ref().unwrap();
    assert_eq!(
        config.databases[0]
            .upstream
            .password
            .as_ref()
            .map(Secret::expose),
        Some("s3cret-env")
    );
    assert_eq!(
        loaded.sources["databases.app.password"],
        Origin::Env("PGPASSWORD".into())
    );
    assert!(!loaded.render_redacted().contains("s3cret"));
    // The string's password wins.
    let u = upstream(
        &["--upstream", "postgres://app:own@h/app"],
        &[("PGPASSWORD", "env")],
    );
    assert_eq!(u.password.as_ref().map(Secret::expose), Some("own"));

    let e = one_error(
        &[
            "--upstream",
            &format!("postgres://app@{RDS_HOST}/d?auth=iam"),
        ],
        &[("PGPASSWORD", "s3cret-env")],
    );
    assert_eq!(
        (e.key.as_str(), e.source.as_str()),
        ("databases.d.password", "PGPASSWORD")
    );
    assert!(e.message.contains("auth=iam"), "{e}");
    assert!(e.fix.contains("unset PGPASSWORD"), "{e}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

#[test]
fn several_hosts_render_and_load_back() {
    let toml = file(
        "[databases.app]\nupstream = \"host=h1,::1,h3 port=5432,5433,5434 hostaddr=10.0.0.1,,10.0.0.3 user=u dbname=d load_balance_hosts=random connect_timeout=9 application_name='a b' options='-c x=1'\"\n",
    );
    let loaded = Config::load(["iampool", "--config", path(&toml)], Vec::new()).unwrap();
    let rendered = loaded.render_redacted();
    assert!(
        rendered.contains("postgres://u@h1:5432,[::1]:5433,h3:5434/d?hostaddr="),
        "{rendered}"
    );
    let again = file(&rendered);
    let mut reloaded = Config::from_args(&["--config", path(&again)], &[]).unwrap();
    reloaded.watched_files = vec![toml.path().to_path_buf()];
    assert_eq!(Some(&reloaded), loaded.config.as_ref(), "{rendered}");
}

#[test]
fn the_aurora_example_is_a_valid_configuration() {
    let example = include_str!("../../config/aurora.toml");
    let users = file("\"app\" \"secret\"\n");
    let toml = file(&example.replace("/etc/iampool/userlist.txt", path(&users)));
    let config =
        Config::from_args(&["--config", path(&toml)], &[]).unwrap_or_else(|e| panic!("{e}"));
    let db = |name: &str| config.databases.iter().find(|d| d.name == name).unwrap();
    assert_eq!(db("app").read_only_database.as_deref(), Some("app_ro"));
    assert_eq!(
        db("app").upstream.target_session_attrs,
        TargetSessionAttrs::ReadWrite
    );
    assert_eq!(
        db("app_ro").upstream.target_session_attrs,
        TargetSessionAttrs::ReadOnly
    );
    assert_eq!(
        db("app_ro").upstream.hosts[0].name,
        "mydb.cluster-ro-abc123.us-east-1.rds.amazonaws.com"
    );
    assert!(matches!(db("app_ro").upstream.auth, UpstreamAuth::Iam(_)));
}

#[test]
fn tcp_options_default_to_pgbouncers_and_are_checked() {
    let url = "postgres://u@h/d";
    let config = Config::from_args(&["--upstream", url], &[]).unwrap();
    assert_eq!(config.tcp, TcpOptions::default());
    assert!(config.tcp.keepalive);
    let config = Config::from_args(
        &[
            "--upstream",
            url,
            "--tcp-keepidle",
            "1min",
            "--tcp-keepintvl",
            "5",
            "--tcp-keepcnt",
            "4",
            "--tcp-user-timeout",
            "2500ms",
            "--tcp-keepalive",
            "false",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(
        config.tcp,
        TcpOptions {
            keepalive: false,
            keepidle: Some(Duration::from_secs(60)),
            keepintvl: Some(Duration::from_secs(5)),
            keepcnt: Some(4),
            user_timeout: Some(Duration::from_millis(2500)),
        }
    );
    let all = errors(
        &[
            "--upstream",
            url,
            "--tcp-keepidle",
            "1500ms",
            "--tcp-keepintvl",
            "40000",
            "--tcp-keepcnt",
            "200",
        ],
        &[],
    );
    let lines: Vec<String> = all.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for key in ["tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt"] {
        let line = lines.iter().find(|l| l.starts_with(key)).expect(key);
        assert!(line.contains("0 for the system's value"), "{line}");
    }
}

#[test]
fn reserve_pool_defaults_to_none_and_is_set_per_database() {
    let config = Config::from_args(&["--upstream", "postgres://u@h/d"], &[]).unwrap();
    assert_eq!(config.databases[0].reserve_pool_size, 0);
    assert_eq!(config.reserve_pool_timeout, Duration::from_secs(5));
    let config = Config::from_args(
        &[
            "--upstream",
            "postgres://u@h/a?reserve_pool_size=3 postgres://u@h/b",
            "--reserve-pool-size",
            "1",
            "--reserve-pool-timeout",
            "250ms",
        ],
        &[],
    )
    .unwrap();
    let sizes: Vec<usize> = config
        .databases
        .iter()
        .map(|d| d.reserve_pool_size)
        .collect();
    assert_eq!(sizes, [3, 1]);
    assert_eq!(config.reserve_pool_timeout, Duration::from_millis(250));
    let e = one_error(
        &[
            "--upstream",
            "postgres://u@h/d",
            "--reserve-pool-size",
            "many",
        ],
        &[],
    );
    assert_eq!(e.key, "reserve_pool_size");
}

#[test]
fn server_check_defaults_to_no_query_and_30s() {
    let config = Config::from_args(&["--upstream", "postgres://u@h/d"], &[]).unwrap();
    assert_eq!(config.server_check_query, "");
    assert_eq!(config.server_check_delay, Duration::from_secs(30));
    let config = Config::from_args(
        &[
            "--upstream",
            "postgres://u@h/d",
            "--server-check-query",
            "select 1",
            "--server-check-delay",
            "0",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(config.server_check_query, "select 1");
    assert_eq!(config.server_check_delay, Duration::ZERO);
}

#[test]
fn connection_caps_default_to_none() {
    let config = Config::from_args(
        &[
            "--upstream",
            "postgres://u@h/a?max_db_connections=7 postgres://u@h/b",
            "--max-user-connections",
            "9",
        ],
        &[],
    )
    .unwrap();
    let caps: Vec<usize> = config
        .databases
        .iter()
        .map(|d| d.max_db_connections)
        .collect();
    assert_eq!(caps, [7, 0]);
    assert_eq!(config.max_user_connections, 9);
    let e = one_error(
        &[
            "--upstream",
            "postgres://u@h/d",
            "--max-db-connections",
            "lots",
        ],
        &[],
    );
    assert_eq!(e.key, "max_db_connections");
}
