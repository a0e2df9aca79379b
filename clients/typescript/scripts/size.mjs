// Prints the minified + gzipped size of dist/customws.min.js (npm run build first).
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

const min = readFileSync(new URL("../dist/customws.min.js", import.meta.url));
const gz = gzipSync(min, { level: 9 }).length;
console.log(`customws.min.js: ${min.length} bytes minified, ${gz} bytes gzipped`);
if (gz > 8192) {
  console.error("over the 8 KB budget");
  process.exit(1);
}
