# Loads a Homebrew formula with a stand-in for Homebrew's DSL and prints, as
# JSON, what it declares: version, each url with its sha256 and the
# platform it is for, and the files its install method takes from the
# archive. deploy/check_services.py checks these against SHA256SUMS and the
# archives. Runs with plain Ruby (no Homebrew on Linux CI).
#
#   ruby deploy/homebrew/formula_facts.rb dist/keyrelay.rb
require "json"

# Records what install() asks to install into one of the formula's directories.
class InstallDir
  def initialize(name, taken)
    @name = name
    @taken = taken
  end

  def install(*files)
    files.each do |file|
      sources = file.is_a?(Hash) ? file.keys : [file]
      sources.each { |source| @taken << { "dir" => @name, "file" => source.to_s } }
    end
  end
end

class Formula
  class << self
    def facts
      @facts ||= { "urls" => [], "installs" => [] }
    end

    %w[desc homepage version license].each do |field|
      define_method(field) { |value = nil| facts[field] = value unless value.nil? }
    end

    def platform(key, value)
      @platform = (@platform || {}).merge(key => value)
      yield
    ensure
      @platform.delete(key)
    end

    def on_macos(&block) = platform("os", "macos", &block)
    def on_linux(&block) = platform("os", "linux", &block)
    def on_arm(&block) = platform("arch", "arm64", &block)
    def on_intel(&block) = platform("arch", "x86_64", &block)

    def url(address)
      facts["urls"] << @platform.merge("url" => address)
    end

    def sha256(digest)
      facts["urls"].last["sha256"] = digest
    end

    # Blocks Homebrew runs after installing; not the archive's business.
    def test(*) = nil
    def service(*) = nil
  end

  %w[bin man1 bash_completion zsh_completion fish_completion doc].each do |dir|
    define_method(dir) { InstallDir.new(dir, self.class.facts["installs"]) }
  end

  def opt_prefix = "OPT_PREFIX"
end

load ARGV.fetch(0)
formula = Object.const_get(:Keyrelay)
formula.new.install
puts JSON.pretty_generate(formula.facts)
