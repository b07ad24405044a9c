// Builds dist/: ESM and CJS for bundlers and Node, a minified browser ESM bundle and an
// IIFE (global `WsChat`), and the .d.ts files (tsc); prints the browser bundle's size.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const { version } = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
process.chdir(root);
rmSync("dist", { recursive: true, force: true });

const common = {
  entryPoints: ["src/index.ts"],
  bundle: true,
  target: "es2020",
  sourcemap: true,
  logLevel: "warning",
  banner: { js: `/* wschat-client ${version} */` },
  define: { __WSCHAT_VERSION__: JSON.stringify(version) },
};
await Promise.all([
  build({ ...common, format: "esm", platform: "neutral", outfile: "dist/index.mjs" }),
  build({ ...common, format: "cjs", platform: "node", outfile: "dist/index.cjs" }),
  build({ ...common, format: "esm", platform: "browser", minify: true, outfile: "dist/wschat-client.browser.js" }),
  build({ ...common, format: "iife", globalName: "WsChat", platform: "browser", minify: true, outfile: "dist/wschat-client.iife.js" }),
]);
const tsc = join(root, "node_modules", ".bin", "tsc");
execFileSync(tsc, ["-p", "tsconfig.json"], { stdio: "inherit" });
// The same declarations as .d.cts for `require` (the package is "type": "module", so
// TypeScript reads .d.ts files as ESM and would refuse them to a CommonJS importer).
mkdirSync("dist/types-cjs", { recursive: true });
for (const file of readdirSync("dist/types")) {
  if (!file.endsWith(".d.ts")) continue;
  const text = readFileSync(join("dist/types", file), "utf8").replace(/(from\s+["']\.\/[^"']+)\.js(["'])/g, "$1.cjs$2");
  writeFileSync(join("dist/types-cjs", file.replace(/\.d\.ts$/, ".d.cts")), text);
}
// Both kinds of TypeScript consumer compile against the package as published.
execFileSync(tsc, ["-p", "test/types/tsconfig.json"], { stdio: "inherit" });

for (const file of ["dist/wschat-client.browser.js", "dist/wschat-client.iife.js"]) {
  const code = readFileSync(file);
  if (code.includes("require(\"ws\")") || code.includes("node_modules/ws")) throw new Error(`${file} pulls in ws`);
  console.log(`${file}: ${(code.length / 1024).toFixed(1)} kB min, ${(gzipSync(code, { level: 9 }).length / 1024).toFixed(1)} kB min+gzip`);
}
