//! An SMTP server in this process, for the email sink's tests: the `mailin` crate's
//! SMTP state machine (command parser, RFC 5321 replies, EHLO extensions, STARTTLS
//! negotiation, AUTH PLAIN and LOGIN) driven over tokio sockets, with rustls for
//! STARTTLS and implicit TLS and a certificate made by rcgen for each server.
//! `mailin` leaves the I/O to its user; this module is that I/O, plus a script of
//! replies to give instead of the normal ones (a 451, a 552, a 421 greeting).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use mailin::{Action, AuthMechanism, Handler, Response, Session, SessionBuilder};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// How clients reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain SMTP, no STARTTLS offered (a local relay).
    Plain,
    /// Plain SMTP that offers STARTTLS; AUTH is offered only after it.
    StartTls,
    /// TLS from the first byte (port 465 style).
    ImplicitTls,
}

/// Where a scripted reply replaces the server's normal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The greeting on connect (e.g. 421: busy, closing).
    Greeting,
    /// AUTH (instead of checking the credentials).
    Auth,
    /// MAIL FROM.
    Mail,
    /// RCPT TO (each recipient is one step).
    Rcpt,
    /// The end of DATA: the message is not kept.
    DataEnd,
}

/// A message the server accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub to: Vec<String>,
    /// The message as sent, headers and body, dot-unstuffed.
    pub data: String,
    /// The connection was TLS (implicit or after STARTTLS).
    pub tls: bool,
    /// The user it logged in as, if any.
    pub user: Option<String>,
}

#[derive(Default)]
struct Shared {
    script: VecDeque<(At, u16, String)>,
    received: Vec<Received>,
    /// Every reply code sent, in order, per connection joined.
    replies: Vec<u16>,
    connections: usize,
}

/// A running server, stopped on drop.
pub struct SmtpServer {
    pub port: u16,
    /// The server's self-signed certificate, PEM: trust it to connect with TLS.
    pub cert_pem: String,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpServer {
    /// Starts a server on a free loopback port. With `credentials`, it offers AUTH
    /// PLAIN and LOGIN (over TLS only) and requires a login before MAIL.
    pub async fn start(security: Security, credentials: Option<(&str, &str)>) -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .expect("a certificate");
        let cert_pem = certified.cert.pem();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(certified.cert.der().to_vec())],
            key,
        )
        .expect("a server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let mut builder = SessionBuilder::new("smtp.test");
        if security == Security::StartTls {
            builder.enable_start_tls();
        }
        if credentials.is_some() {
            builder
                .enable_auth(AuthMechanism::Plain)
                .enable_auth(AuthMechanism::Login);
        }
        let credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((stream, peer)) = listener.accept().await {
                    let conn = Connection {
                        shared: shared.clone(),
                        credentials: credentials.clone(),
                        tls: Arc::new(AtomicBool::new(false)),
                        hang_up: Arc::new(AtomicBool::new(false)),
                        user: None,
                        from: String::new(),
                        to: Vec::new(),
                        data: Vec::new(),
                    };
                    let (builder, acceptor) = (builder.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        // A client that hangs up mid-session is its own business.
                        let _ = serve(stream, peer, security, builder, acceptor, conn).await;
                    });
                }
            })
        };
        SmtpServer {
            port,
            cert_pem,
            shared,
            task,
        }
    }

    /// Replies to give instead of the normal ones, in order, each once.
    pub fn script(&self, replies: impl IntoIterator<Item = (At, u16, &'static str)>) {
        let mut shared = self.shared.lock().unwrap();
        for (at, code, text) in replies {
            shared.script.push_back((at, code, text.to_owned()));
        }
    }

    /// The messages accepted so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().unwrap().received.clone()
    }

    /// Every reply code sent so far, in order.
    pub fn replies(&self) -> Vec<u16> {
        self.shared.lock().unwrap().replies.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().unwrap().connections
    }
}

/// One client's session state: what `mailin` hands the handler.
struct Connection {
    shared: Arc<Mutex<Shared>>,
    credentials: Option<(String, String)>,
    tls: Arc<AtomicBool>,
    /// Set when the reply being sent ends the connection (see `data_end`).
    hang_up: Arc<AtomicBool>,
    user: Option<String>,
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
}

impl Connection {
    fn scripted(&self, at: At) -> Option<Response> {
        let mut shared = self.shared.lock().unwrap();
        if shared.script.front().is_some_and(|(a, ..)| *a == at) {
            let (_, code, text) = shared.script.pop_front().expect("front");
            return Some(Response::custom(code, text));
        }
        None
    }

    fn login(&mut self, user: &str, password: &str) -> Response {
        if let Some(reply) = self.scripted(At::Auth) {
            return reply;
        }
        match &self.credentials {
            Some((u, p)) if u == user && p == password => {
                self.user = Some(user.to_owned());
                mailin::response::AUTH_OK
            }
            _ => Response::custom(535, "5.7.8 Authentication credentials invalid".into()),
        }
    }
}

impl Handler for Connection {
    fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
        if let Some(reply) = self.scripted(At::Mail) {
            return reply;
        }
        self.from = from.to_owned();
        self.to.clear();
        self.data.clear();
        mailin::response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        if let Some(reply) = self.scripted(At::Rcpt) {
            return reply;
        }
        self.to.push(to.to_owned());
        mailin::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let data = std::mem::take(&mut self.data);
        if let Some(reply) = self.scripted(At::DataEnd) {
            // mailin 0.6.5 stays in its DATA state after a refusal there (RFC 5321
            // ends the transaction either way) and would take the next command as
            // message text: hang up after the reply instead.
            self.hang_up.store(true, Ordering::SeqCst);
            return reply;
        }
        self.shared.lock().unwrap().received.push(Received {
            from: self.from.clone(),
            to: self.to.clone(),
            data: String::from_utf8_lossy(&data).into_owned(),
            tls: self.tls.load(Ordering::SeqCst),
            user: self.user.clone(),
        });
        mailin::response::OK
    }

    fn auth_plain(&mut self, _authz: &str, user: &str, password: &str) -> Response {
        self.login(user, password)
    }

    fn auth_login(&mut self, user: &str, password: &str) -> Response {
        self.login(user, password)
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    security: Security,
    builder: SessionBuilder,
    acceptor: TlsAcceptor,
    conn: Connection,
) -> io::Result<()> {
    let shared = conn.shared.clone();
    let tls = conn.tls.clone();
    let hang_up = conn.hang_up.clone();
    shared.lock().unwrap().connections += 1;
    let greeting = conn.scripted(At::Greeting);
    let mut session = builder.build(peer.ip(), conn);
    let greeting = greeting.unwrap_or_else(|| session.greeting());
    let close = greeting.action == Action::Close;
    if security == Security::ImplicitTls {
        let mut stream = acceptor.accept(stream).await?;
        tls.store(true, Ordering::SeqCst);
        session.tls_active();
        reply(&mut stream, &greeting, &shared).await?;
        if !close {
            lines(&mut session, stream, &shared, &hang_up).await?;
        }
        return Ok(());
    }
    let mut stream = stream;
    reply(&mut stream, &greeting, &shared).await?;
    if close {
        return Ok(());
    }
    if let Some(stream) = lines(&mut session, stream, &shared, &hang_up).await? {
        let stream = acceptor.accept(stream).await?;
        tls.store(true, Ordering::SeqCst);
        session.tls_active();
        lines(&mut session, stream, &shared, &hang_up).await?;
    }
    Ok(())
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &Response,
    shared: &Mutex<Shared>,
) -> io::Result<()> {
    shared.lock().unwrap().replies.push(response.code);
    stream.write_all(&response.buffer()?).await?;
    stream.flush().await
}

/// Runs the session over `stream` until the client quits (`None`) or STARTTLS is
/// accepted (`Some(stream)`, to be wrapped in TLS).
async fn lines<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<Connection>,
    stream: S,
    shared: &Mutex<Shared>,
    hang_up: &AtomicBool,
) -> io::Result<Option<S>> {
    let mut stream = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if stream.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        let response = session.process(&line);
        match response.action {
            Action::NoReply => {}
            Action::Reply if !hang_up.load(Ordering::SeqCst) => {
                reply(stream.get_mut(), &response, shared).await?
            }
            Action::Reply | Action::Close => {
                reply(stream.get_mut(), &response, shared).await?;
                let _ = stream.get_mut().shutdown().await;
                return Ok(None);
            }
            Action::UpgradeTls => {
                reply(stream.get_mut(), &response, shared).await?;
                // The client waits for the 220 before its handshake: nothing is buffered.
                return Ok(Some(stream.into_inner()));
            }
        }
    }
}
