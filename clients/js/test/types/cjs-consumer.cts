// Compiled by the build: a CommonJS module requiring the package by its name.
import wschat = require("wschat-client");

const chat = new wschat.ChatClient({ url: () => "ws://localhost:8080/ws", getToken: async () => "jwt" });
chat.on("joined", (e) => e.rejoin === true);
const n: number = wschat.backoffDelay(3);
const page: Promise<wschat.HistoryPage> = chat.historyPage("general");
export = { chat, n, page };
