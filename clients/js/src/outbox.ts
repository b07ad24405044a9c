/** The outbox: sends kept until the server acknowledges them, optionally persisted. */

/** A send waiting for its acknowledgement (the server's echo carrying its `client_msg_id`). */
export type OutboxEntry =
  | { kind: "message"; room: string; text: string; client_msg_id: string; created: number }
  | { kind: "dm"; to: string; text: string; client_msg_id: string; created: number };

/**
 * Where the outbox is kept between page loads or process runs. `save` gets the whole
 * outbox after every change (it is bounded, so small); saves are made one after another.
 */
export interface OutboxStorage {
  load(): OutboxEntry[] | Promise<OutboxEntry[]>;
  save(entries: readonly OutboxEntry[]): void | Promise<void>;
}

/** The part of the Web Storage API the adapter needs (localStorage, sessionStorage). */
export interface WebStorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/**
 * Keeps the outbox in Web Storage under `key`. The default, `sessionStorage`, survives a
 * page reload and belongs to one tab, so two tabs never overwrite each other's outbox;
 * pass `localStorage` to keep sends across closing the tab too (then give each tab, and
 * each user, its own key).
 */
export function webStorageOutbox(key = "wschat-outbox", storage?: WebStorageLike): OutboxStorage {
  const store = (): WebStorageLike => {
    const s = storage ?? (globalThis as { sessionStorage?: WebStorageLike }).sessionStorage;
    if (!s) throw new Error("webStorageOutbox: no sessionStorage here; pass a storage");
    return s;
  };
  return {
    load() {
      const raw = store().getItem(key);
      if (!raw) return [];
      try {
        const parsed: unknown = JSON.parse(raw);
        return Array.isArray(parsed) ? parsed.filter(isEntry) : [];
      } catch {
        return [];
      }
    },
    save(entries) {
      if (entries.length === 0) store().removeItem(key);
      else store().setItem(key, JSON.stringify(entries));
    },
  };
}

/** An in-memory storage (tests, or several client instances in one process). */
export function memoryOutbox(initial: OutboxEntry[] = []): OutboxStorage & { entries: OutboxEntry[] } {
  const box = {
    entries: initial.map((e) => ({ ...e })),
    load: () => box.entries.map((e) => ({ ...e })),
    save: (entries: readonly OutboxEntry[]) => {
      box.entries = entries.map((e) => ({ ...e }));
    },
  };
  return box;
}

export function isEntry(value: unknown): value is OutboxEntry {
  if (typeof value !== "object" || value === null) return false;
  const e = value as Record<string, unknown>;
  if (typeof e.text !== "string" || typeof e.client_msg_id !== "string") return false;
  if (e.kind === "message") return typeof e.room === "string";
  if (e.kind === "dm") return typeof e.to === "string";
  return false;
}

/**
 * The ordered, bounded list of unacknowledged sends. Every change is handed to the
 * storage at once (a synchronous storage such as localStorage has it before `send`
 * returns); while an asynchronous save is under way, later changes are coalesced into
 * one save of the newest list, so saves never overlap or land out of order.
 */
export class Outbox {
  private list: OutboxEntry[] = [];
  private saving: Promise<void> | null = null;
  private dirty = false;
  /** A restore is reading an asynchronous storage: saves wait for it (`deferred`). */
  private restoring = false;
  private deferred = false;

  constructor(
    readonly limit: number,
    private readonly storage: OutboxStorage | undefined,
    private readonly onStorageError: (err: unknown) => void,
  ) {}

  get entries(): readonly OutboxEntry[] {
    return this.list;
  }

  get size(): number {
    return this.list.length;
  }

  get full(): boolean {
    return this.list.length >= this.limit;
  }

  has(clientMsgId: string): boolean {
    return this.list.some((e) => e.client_msg_id === clientMsgId);
  }

  /** Loads the stored entries, placed before any added since (they were made earlier). */
  async restore(): Promise<OutboxEntry[]> {
    if (!this.storage) return [];
    let loaded: OutboxEntry[];
    try {
      // A synchronous storage is read at once (no await): a send queued right after this
      // call is saved with what the storage kept, not over it.
      const result = this.storage.load();
      if (result && typeof (result as Promise<OutboxEntry[]>).then === "function") {
        this.restoring = true; // saves wait: the storage may not have been read yet
        loaded = await result;
      } else {
        loaded = result as OutboxEntry[];
      }
      loaded = loaded.filter(isEntry);
    } catch (err) {
      this.onStorageError(err);
      loaded = [];
    }
    this.restoring = false;
    const fresh = loaded.filter((e) => !this.has(e.client_msg_id));
    this.list = [...fresh, ...this.list];
    if (fresh.length || this.deferred) {
      this.deferred = false;
      this.persist();
    }
    return fresh;
  }

  add(entry: OutboxEntry): void {
    this.list.push(entry);
    this.persist();
  }

  remove(clientMsgId: string): OutboxEntry | undefined {
    const i = this.list.findIndex((e) => e.client_msg_id === clientMsgId);
    if (i < 0) return undefined;
    const [entry] = this.list.splice(i, 1);
    this.persist();
    return entry;
  }

  /** Resolves once every change so far has been saved. */
  async flushed(): Promise<void> {
    while (this.saving) await this.saving;
  }

  private persist(): void {
    if (!this.storage) return;
    if (this.restoring) {
      // Saving now could replace what the storage kept before it has been read.
      this.deferred = true;
      return;
    }
    if (this.saving) {
      this.dirty = true;
      return;
    }
    let result: void | Promise<void>;
    try {
      result = this.storage.save(this.list.map((e) => ({ ...e })));
    } catch (err) {
      this.onStorageError(err);
      return;
    }
    if (result && typeof (result as Promise<void>).then === "function") {
      this.saving = (result as Promise<void>).then(
        () => this.saved(),
        (err) => {
          this.onStorageError(err);
          this.saved();
        },
      );
    }
  }

  private saved(): void {
    this.saving = null;
    if (this.dirty) {
      this.dirty = false;
      this.persist();
    }
  }
}
