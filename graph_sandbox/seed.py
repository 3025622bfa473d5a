"""Deterministic, realistic tenant data from a seed.

Same ``seed``, ``users`` and ``messages_per_user`` -> same users, folders,
messages and ids. Each user and mailbox has its own random stream (``seed``
+ user index), so adding users keeps the existing users; their mail may
differ, since colleagues send some of it. Bodies are not stored for seeded mail: they are generated
from a per-message seed when asked for (see :func:`generated_body`), which
keeps a 100,000-message tenant small in memory.

Shape of a mailbox: Outlook's well-known folders (Inbox, Drafts, Sent Items,
Deleted Items, Archive, Junk Email, Outbox, Conversation History) plus a few
user folders, some nested; mail dated back over two years from the config's
``anchor``, older mail mostly read, a few flagged, categorised or important.
"""

from __future__ import annotations

import base64
import html
import random
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache

from graph_sandbox.config import SandboxConfig
from graph_sandbox.mailbox import WELL_KNOWN_FOLDERS, Mailbox, Mailboxes, Message, SearchSpec, iso, recipient

TENANT_DOMAIN = "contoso.onmicrosoft.com"

# Microsoft's own demo-tenant people first, then generated names.
PERSONAS = [
    ("Adele", "Vance", "Retail Manager", "18/2111"),
    ("Alex", "Wilber", "Marketing Assistant", "131/1104"),
    ("Megan", "Bowen", "Marketing Manager", "12/1110"),
    ("Lee", "Gu", "Director", "23/3101"),
    ("Nestor", "Wilke", "Director", "36/2121"),
    ("Lynne", "Robbins", "Planner", "20/1109"),
    ("Diego", "Siciliani", "HR Manager", "14/1108"),
    ("Isaiah", "Langer", "Sales Rep", "20/1101"),
    ("Johanna", "Lorenz", "Senior Engineer", "23/2102"),
    ("Joni", "Sherman", "Paralegal", "20/1109"),
    ("Grady", "Archie", "Designer", "19/2109"),
    ("Henrietta", "Mueller", "Developer", "18/1106"),
    ("Irvin", "Sayers", "Director", "20/2107"),
    ("Lidia", "Holloway", "Product Manager", "20/2104"),
    ("Miriam", "Graham", "Director", "131/2103"),
    ("Patti", "Fernandez", "President", "15/1102"),
    ("Pradeep", "Gupta", "Accountant", "98/2202"),
]
FIRST = ["Ava", "Ben", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe"]
LAST = ["Andersen", "Brooks", "Carvalho", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito", "Jansen",
        "Kowalski", "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Rossi", "Silva", "Tanaka", "Novak"]
TITLES = ["Analyst", "Engineer", "Consultant", "Account Manager", "Support Lead", "Buyer", "Controller"]

CONTACTS = [
    ("Dana Swope", "dana.swope@fabrikam.com"), ("Samantha Booth", "samantha.booth@fabrikam.com"),
    ("Elliot Hyde", "elliot.hyde@tailspintoys.com"), ("Randi Welch", "randiw@northwindtraders.com"),
    ("Jodie Sharp", "jodie.sharp@adventure-works.com"), ("Kelly Krout", "kkrout@wingtiptoys.com"),
    ("Marco Ruiz", "marco.ruiz@litwareinc.com"), ("Priya Nair", "priya.nair@woodgrovebank.com"),
    ("Tomasz Wrobel", "t.wrobel@proseware.com"), ("Aiko Mori", "aiko.mori@fourthcoffee.com"),
    ("Rachel Green", "rgreen@lucernepublishing.com"), ("Oscar Lind", "oscar.lind@margiestravel.com"),
    ("Fatima Zahra", "fatima@alpineskihouse.com"), ("Hannah Becker", "h.becker@contoso-pharma.com"),
    ("Victor Chen", "victor.chen@relecloud.com"), ("Lucia Romano", "lucia.romano@trey-research.net"),
]
SERVICES = [
    ("Contoso Airlines", "noreply@contosoair.com"), ("Northwind Bank", "alerts@northwindbank.com"),
    ("Fabrikam Shop", "orders@fabrikamshop.com"), ("Tailspin Cloud", "billing@tailspin.cloud"),
    ("Litware Learning", "newsletter@litwarelearning.com"), ("Woodgrove Energy", "account@woodgrove-energy.com"),
    ("Adventure Works Cycles", "news@adventure-works.com"), ("Microsoft 365", "no-reply@microsoft.com"),
]
PROJECTS = ["Apollo", "Zephyr", "Northstar", "Falcon", "Bluebird", "Mercury", "Aurora", "Summit"]
TOPICS = ["budget review", "Q3 roadmap", "hiring plan", "vendor shortlist", "launch checklist",
          "customer feedback", "security audit", "offsite agenda", "pricing update", "release notes"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
CATEGORIES = ["Blue category", "Green category", "Orange category", "Purple category", "Red category",
              "Yellow category", "Follow up", "Customers"]

SUBJECTS_PEOPLE = [
    "{project} status update", "Re: {project} status update", "Notes from today's {topic} meeting",
    "Can we move our 1:1 to {day}?", "Draft: {topic}", "Quick question about the {topic}",
    "Re: {topic}", "Fwd: {topic}", "Lunch on {day}?", "Action items: {project} kickoff",
    "Re: Re: {project} timeline", "Feedback on the {topic} deck", "Invitation: {project} sync ({day})",
]
SUBJECTS_SERVICES = [
    "Your receipt from {service} #{num}", "Invoice {num} is ready", "Your flight confirmation {code}",
    "Weekly digest from {service}", "Security alert: new sign-in", "Your statement is available",
    "Order {num} has shipped", "Reminder: payment due on {day}", "Welcome to {service}",
]
SENTENCES = [
    "Thanks for pulling this together so quickly.", "I have attached the latest numbers for your review.",
    "Could you take a look before the end of the week?", "Let me know if anything is unclear.",
    "We agreed to revisit the timeline once the estimates are in.", "The team is aligned on the next steps.",
    "I will circulate the updated draft tomorrow morning.", "Please confirm the details below.",
    "A few open questions remain about scope and staffing.", "This should unblock the remaining work.",
    "Happy to jump on a call if that is easier.", "The vendor came back with a revised quote.",
    "We are still waiting on legal to sign off.", "Here is a short summary of where we landed.",
    "Looping in the rest of the group for visibility.", "No action needed on your side for now.",
]

# Folder -> share of a mailbox's mail.
FOLDER_WEIGHTS = [
    ("inbox", 52), ("archive", 14), ("sentitems", 13), ("user", 13), ("deleteditems", 4),
    ("junkemail", 2), ("drafts", 2),
]
USER_FOLDER_TREES = [
    ("Projects", ["Apollo", "Zephyr"]),
    ("Receipts", []),
    ("Travel", []),
    ("Newsletters", []),
    ("Clients", ["Northwind", "Fabrikam"]),
    ("Family", []),
]


@dataclass
class Tenant:
    domain: str
    users: list  # list[SandboxUser]; typed loosely to avoid an import cycle with state
    mailboxes: list[Mailbox]


def seed_tenant(config: SandboxConfig, mailboxes: Mailboxes) -> Tenant:
    """Build the users and their filled mailboxes for ``config``."""
    from graph_sandbox.state import SandboxUser  # late: state imports this module

    users: list[SandboxUser] = []
    for index in range(config.users):
        users.append(_user(config.seed, index, SandboxUser))
    people = [recipient(u.mail, u.display_name) for u in users]
    boxes = []
    for user in users:
        box = mailboxes.new_mailbox(user.id, user.mail, user.display_name, id_salt=f"{config.seed}:{user.index}")
        fill_mailbox(box, random.Random(f"mailbox:{config.seed}:{user.index}"), config, colleagues=people)
        boxes.append(box)
    return Tenant(TENANT_DOMAIN, users, boxes)


def _user(seed: int, index: int, cls: type) -> object:
    rng = random.Random(f"user:{seed}:{index}")
    if index < len(PERSONAS):
        given, surname, title, office = PERSONAS[index]
        alias = f"{given}{surname[0]}"
    else:
        given, surname = FIRST[index % len(FIRST)], LAST[(index // len(FIRST)) % len(LAST)]
        title, office = rng.choice(TITLES), f"{rng.randint(10, 99)}/{rng.randint(1000, 3999)}"
        alias = f"{given}.{surname}{index}"
    mail = f"{alias}@{TENANT_DOMAIN}"
    return cls(
        id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        index=index,
        display_name=f"{given} {surname}",
        given_name=given,
        surname=surname,
        mail=mail,
        user_principal_name=mail,
        job_title=title,
        office_location=office,
        business_phones=(f"+1 425 555 {rng.randint(100, 999):04d}",),
        mobile_phone=None,
    )


def fill_mailbox(box: Mailbox, rng: random.Random, config: SandboxConfig, *, colleagues: list[dict]) -> None:
    """Create the folder tree and ``config.messages_per_user`` messages."""
    for name, display in WELL_KNOWN_FOLDERS.items():
        box._new_folder(display, parent_id=box.root_id, well_known=name)
    user_folders: list[str] = []
    inbox = box.well_known["inbox"]
    trees = rng.sample(USER_FOLDER_TREES, k=rng.randint(3, 5))
    for top_name, kids in trees:
        # Some user folders live under the Inbox, as people often file them.
        parent = inbox if top_name in ("Clients", "Receipts") else box.root_id
        top = box._new_folder(top_name, parent_id=parent, well_known=None)
        user_folders.append(top.id)
        for kid in kids:
            user_folders.append(box._new_folder(kid, parent_id=top.id, well_known=None).id)
    anchor_ms = int(config.anchor.timestamp() * 1000)
    others = [c for c in colleagues if c["emailAddress"]["address"] != box.address] or colleagues
    contacts = [recipient(a, n) for n, a in CONTACTS]
    services = [recipient(a, n) for n, a in SERVICES]
    kinds = [k for k, _ in FOLDER_WEIGHTS]
    weights = [w for _, w in FOLDER_WEIGHTS]
    for _ in range(config.messages_per_user):
        kind = rng.choices(kinds, weights)[0]
        folder_id = rng.choice(user_folders) if kind == "user" else box.well_known[kind]
        _add_seeded_message(box, rng, anchor_ms, folder_id, kind, others, contacts, services)
    _seed_search_folders(box, config.search_folders)
    box.change_clock.settle()


# Search folders a person would have made (Outlook offers both): created last so
# that every other id of the seeded mailbox is the same with or without them.
SEEDED_SEARCH_FOLDERS = (
    ("Unread Mail", ("inbox",), True, "isRead eq false"),
    ("Flagged Mail", ("msgfolderroot",), True, "flag/flagStatus eq 'flagged'"),
)


def _seed_search_folders(box: Mailbox, count: int) -> None:
    for name, sources, nested, query in SEEDED_SEARCH_FOLDERS[:count]:
        spec = SearchSpec(tuple(box.folder(s).id for s in sources), nested, query)
        box.create_search_folder(box.root_id, name, spec, emit=False)


def new_mail(box: Mailbox, rng: random.Random, colleagues: list[dict], now_ms: int,
             folder: str = "inbox") -> Message:
    """One realistic incoming message arriving now (announced to listeners)."""
    contacts = [recipient(a, n) for n, a in CONTACTS]
    services = [recipient(a, n) for n, a in SERVICES]
    others = [c for c in colleagues if c["emailAddress"]["address"] != box.address] or colleagues
    return _add_seeded_message(box, rng, now_ms, box.folder(folder).id, "inbox", others, contacts, services,
                               arriving_now=True)


def _add_seeded_message(box: Mailbox, rng: random.Random, anchor_ms: int, folder_id: str, kind: str,
                        colleagues: list[dict], contacts: list[dict], services: list[dict], *,
                        arriving_now: bool = False) -> Message:
    # Newer mail is denser: age in days ~ exponential, capped at two years.
    age_s = 0.0 if arriving_now else min(rng.expovariate(1 / (60 * 86400)), 730 * 86400)
    received_ms = anchor_ms - int(age_s * 1000)
    if not arriving_now:
        received_ms -= received_ms % 1000
    outgoing = kind in ("sentitems", "drafts")
    automated = not outgoing and (kind == "junkemail" or rng.random() < 0.35)
    num = rng.randint(10000, 99999)
    if automated:
        sender = rng.choice(services)
        template = rng.choice(SUBJECTS_SERVICES)
    else:
        sender = rng.choice(colleagues if rng.random() < 0.5 else contacts)
        template = rng.choice(SUBJECTS_PEOPLE)
    subject = template.format(project=rng.choice(PROJECTS), topic=rng.choice(TOPICS), day=rng.choice(DAYS),
                              service=sender["emailAddress"]["name"], num=num,
                              code="".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ23456789", k=6)))
    if kind == "junkemail":
        subject = rng.choice(["You have WON", "Final notice: claim your reward", "Re: invoice overdue!!"]) + f" {num}"
    if outgoing:
        author = box.me
        to = tuple(rng.sample(colleagues + contacts, k=rng.choice((1, 1, 1, 2, 3))))
        cc: tuple = tuple(rng.sample(colleagues, k=1)) if rng.random() < 0.2 else ()
    else:
        author = sender
        to = (box.me,) if rng.random() < 0.85 else (box.me, rng.choice(colleagues))
        cc = tuple(rng.sample(colleagues, k=1)) if rng.random() < 0.15 else ()
    recent = (anchor_ms - received_ms) < 14 * 86400 * 1000
    is_read = outgoing or (not arriving_now and rng.random() < (0.45 if recent else 0.96))
    flag_roll = rng.random()
    if flag_roll < 0.04:
        flag = {"flagStatus": "flagged",
                "startDateTime": _dttz(received_ms), "dueDateTime": _dttz(received_ms + 7 * 86400 * 1000)}
    elif flag_roll < 0.06:
        flag = {"flagStatus": "complete", "completedDateTime": _dttz(received_ms + 86400 * 1000)}
    else:
        flag = {"flagStatus": "notFlagged"}
    categories = (rng.choice(CATEGORIES),) if rng.random() < 0.08 else ()
    importance_roll = rng.random()
    importance = "high" if importance_roll < 0.03 else "low" if importance_roll < 0.05 else "normal"
    thread = re.sub(r"^((re|fwd|draft):\s*)+", "", subject, flags=re.IGNORECASE)
    domain = author["emailAddress"]["address"].split("@")[-1]
    conv = box._hash("conv", thread, size=33)
    modified_ms = received_ms + (rng.randint(0, 3 * 86400) * 1000 if (is_read and not outgoing) else 0)
    return box.add_message(
        folder_id, emit=arriving_now,
        subject=subject, sender=author, from_=author, to=to, cc=cc, bcc=(), reply_to=(),
        received_ms=received_ms, sent_ms=received_ms - rng.randint(1, 90) * 1000, created_ms=received_ms,
        modified_ms=min(modified_ms, anchor_ms), is_read=is_read, is_draft=kind == "drafts",
        importance=importance, flag=flag, categories=categories, has_attachments=rng.random() < 0.12,
        internet_message_id=f"<{rng.getrandbits(64):016x}.{num}@{domain}>",
        conversation_id=conv,
        conversation_index=base64.b64encode(received_ms.to_bytes(8, "big") + rng.randbytes(14)).decode(),
        inference="other" if automated else "focused",
        body_seed=rng.getrandbits(48),
    )


def _dttz(ms: int) -> dict[str, str]:
    """A dateTimeTimeZone value in UTC, as Outlook writes it."""
    return {"dateTime": iso(ms)[:-1] + ".0000000", "timeZone": "UTC"}


GREETINGS = ("Hi,", "Hello all,", "Hi team,", "Good morning,", "Hey,")
CLOSINGS = ("Thanks,", "Best regards,", "Cheers,", "Kind regards,")


BODY_VARIANTS = 4096


def generated_body(body_seed: int, subject: str) -> tuple[str, str]:
    """The HTML body and preview of a seeded message (a pure function of its seed).

    Bodies come from 4096 variants (cached) plus the subject: delta pages
    render hundreds of messages per request, and composing text per
    message would cost more than the rest of the message.
    """
    middle, text = _body_variant(body_seed % BODY_VARIANTS)
    return f"{_BODY_HEAD}{middle}<p style=\"color:#666\">Re: {html.escape(subject)}</p></body></html>", text


def generated_preview(body_seed: int) -> str:
    """The bodyPreview of a seeded message (no HTML built)."""
    return _body_variant(body_seed % BODY_VARIANTS)[1]


_BODY_HEAD = '<html><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8"></head><body>'


@lru_cache(maxsize=BODY_VARIANTS)
def _body_variant(variant: int) -> tuple[str, str]:
    rng = random.Random(variant)
    greeting, closing = rng.choice(GREETINGS), rng.choice(CLOSINGS)
    paragraphs = [rng.sample(SENTENCES, k=rng.randint(2, 4)) for _ in range(rng.randint(1, 4))]
    middle = (f"<p>{greeting}</p>" + "".join("<p>" + html.escape(" ".join(p)) + "</p>" for p in paragraphs)
              + f"<p>{closing}</p>")
    text = " ".join([greeting, *(" ".join(p) for p in paragraphs), closing])
    return middle, text[:255]


_TAG = re.compile(r"<[^>]+>")
_HEAD = re.compile(r"<head>.*?</head>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")


def html_to_text(content: str) -> str:
    """The text of an HTML body (for ``Prefer: outlook.body-content-type="text"``)."""
    text = html.unescape(_TAG.sub(" ", _HEAD.sub(" ", content)))
    return _SPACE.sub(" ", text).strip()


def text_preview(content: str) -> str:
    """bodyPreview: the first 255 characters of the body's text."""
    return html_to_text(content)[:255]
