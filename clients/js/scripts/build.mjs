// Builds dist/: ESM and CJS for bundlers and Node, a minified browser ESM bundle and an
// IIFE (global `WsChat`), and the .d.ts files (tsc); prints the browser bundle's size.
import { build } from "esbuild";
import { execFileSync } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
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
execFileSync(join(root, "node_modules", ".bin", "tsc"), ["-p", "tsconfig.json"], { stdio: "inherit" });

for (const file of ["dist/wschat-client.browser.js", "dist/wschat-client.iife.js"]) {
  const code = readFileSync(file);
  if (code.includes("require(\"ws\")") || code.includes("node_modules/ws")) throw new Error(`${file} pulls in ws`);
  console.log(`${file}: ${(code.length / 1024).toFixed(1)} kB min, ${(gzipSync(code, { level: 9 }).length / 1024).toFixed(1)} kB min+gzip`);
}
