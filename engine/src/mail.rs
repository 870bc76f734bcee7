//! Email through an SMTP relay (`--smtp-url`): what alert notifications and reports
//! send. `smtp://host:port` uses STARTTLS when the relay offers it, `smtps://` TLS from
//! the first byte; credentials ride in the URL (`smtp://user:pass@host`).

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};

/// One message: a plain-text and an HTML body, and at most one attached file.
#[derive(Debug, Clone)]
pub struct Email {
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub attachment: Option<File>,
}

/// An attached file.
#[derive(Debug, Clone)]
pub struct File {
    pub name: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// Whether `address` is an email address a message can be sent to.
pub fn check_address(address: &str) -> Result<(), String> {
    address
        .parse::<Mailbox>()
        .map(|_| ())
        .map_err(|e| format!("'{address}' is not an email address ({e})"))
}

/// Sends `email` through `relay`, waiting at most `timeout` for each step.
pub async fn send(relay: &str, timeout: Duration, email: Email) -> Result<(), String> {
    let mut builder = Message::builder()
        .from(
            email
                .from
                .parse()
                .map_err(|e| format!("sender '{}': {e}", email.from))?,
        )
        .subject(email.subject);
    for to in &email.to {
        builder = builder.to(to.parse().map_err(|e| format!("address '{to}': {e}"))?);
    }
    let bodies = MultiPart::alternative_plain_html(email.text, email.html);
    let message = match email.attachment {
        None => builder.multipart(bodies),
        Some(file) => {
            let content_type = ContentType::parse(&file.content_type)
                .map_err(|e| format!("content type '{}': {e}", file.content_type))?;
            let attached: SinglePart = Attachment::new(file.name).body(file.bytes, content_type);
            builder.multipart(MultiPart::mixed().multipart(bodies).singlepart(attached))
        }
    }
    .map_err(|e| format!("building the email: {e}"))?;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(relay)
        .map_err(|e| format!("SMTP relay '{relay}': {e}"))?
        .timeout(Some(timeout))
        .build();
    transport
        .send(message)
        .await
        .map(|_| ())
        .map_err(|e| format!("SMTP: {e}"))
}

/// `s` with `&`, `<` and `>` escaped for HTML text.
pub fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
