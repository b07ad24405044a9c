// Compiled by the build: an ES module importing the package by its name (self-reference).
import { ChatClient, ChatError, webStorageOutbox, type ChatMessage, type HistoryPage, type RemovedEvent } from "wschat-client";

const chat = new ChatClient({ url: "ws://localhost:8080/ws", username: "alice", outboxStorage: webStorageOutbox() });
chat.on("message", (m: ChatMessage) => m.id + 1);
chat.on("removed", (e: RemovedEvent) => e.reason.toUpperCase());
chat.on("error", (e) => (e instanceof ChatError ? e.code : ""));
export const sent: Promise<ChatMessage> = chat.send("general", "hi");
// A page back: `truncated` says older ones were left out for the byte bound.
export const page: Promise<HistoryPage> = chat.historyPage("general", { before: 10, limit: 50 });
export const older: Promise<boolean> = page.then((p) => p.truncated || p.messages.length === 50);
// What the server sends a guest's events with (README "Server -> client"): `guest: true`.
chat.on("presence", (p) => (p.guest === true ? `${p.user} (guest)` : p.user));
chat.on("typing", (t) => t.guest ?? false);
chat.on("dm", (m) => (m.guest ? "guest" : m.from));
chat.on("message", (m) => m.guest === true);
chat.on("joined", (j) => j.users.filter((u) => !u.guest).map((u) => u.username));
