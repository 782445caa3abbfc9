// Types of prerequisites.mjs (plain JS so that it runs before anything is compiled).
export declare const APT_PACKAGES: string[];
export declare const TOOLS: [cmd: string, pkg: string][];
export declare const APT_LINE: string;
export declare function missingPrerequisites(o?: { env?: NodeJS.ProcessEnv; uid?: number; root?: string; loopControl?: string }): string[];
export declare function prerequisitesLine(missing: string[]): string;
